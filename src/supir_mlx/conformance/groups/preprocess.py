"""Fixture group `preprocess`: PIL2Tensor / Tensor2PIL (test.py) and HWC3 / upscale_image / fix_resize (gradio)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .. import Comparison, compare_exact
from ...pipeline import preprocess as pp


def run(fixture, ctx) -> list[Comparison]:
    name, p = fixture.path.stem, fixture.param
    if name.startswith("pil2tensor_"):
        img = Image.fromarray(fixture["image_hwc_uint8"])
        fix = p("fix_resize")
        x, h0, w0 = pp.pil_to_tensor(img, p("upscale"), int(p("min_size")), None if fix is None else int(fix))
        ref_x = fixture["x"].transpose(1, 2, 0)[None]
        return [
            # float x is exact up to 1e-6 absolute (the README's rule for this group), not relative.
            Comparison("x", float(np.abs(x - ref_x).max()), 1e-6),
            compare_exact("h0_w0", np.array([h0, w0]), fixture["h0_w0"]),
            compare_exact("tensor2pil_hwc_uint8", pp.tensor_to_image(ref_x, h0, w0)[0],
                          fixture["tensor2pil_hwc_uint8"]),
        ]
    if name.startswith("gradio_"):
        hwc3 = pp.hwc3(fixture["rgba_uint8"])
        ref3 = fixture["hwc3_uint8"]
        up_img = pp.upscale_image(ref3, p("upscale"), min_size=int(p("min_size")),
                                  unit_resolution=int(p("unit_resolution")))
        fixed = pp.fix_resize(ref3, size=int(p("fix_resize_size")), unit_resolution=int(p("fix_resize_unit_resolution")))
        return [
            compare_exact("hwc3_uint8", hwc3, ref3),
            compare_exact("upscaled_uint8", up_img, fixture["upscaled_uint8"]),
            compare_exact("fix_resize_uint8", fixed, fixture["fix_resize_uint8"]),
        ]
    raise ValueError(f"unknown preprocess fixture {name}")
