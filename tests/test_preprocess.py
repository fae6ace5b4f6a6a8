"""The official pre-processing against the reference fixtures (bit-exact) and its documented size rules."""

import numpy as np
import pytest
from PIL import Image

from supir_mlx.conformance import Context, run_case
from supir_mlx.pipeline import preprocess as pp


def test_preprocess_fixtures_are_bit_exact(reference_dir):
    ctx = Context(reference_dir)
    paths = sorted((reference_dir / "preprocess").glob("*.safetensors"))
    assert len(paths) == 5
    for path in paths:
        result = run_case(path, ctx)
        assert result.status == "PASS", result.line()
        assert all(c.max_abs == 0 for c in result.comparisons), result.line()


def test_processing_size_rounds_half_to_even_and_keeps_output_size():
    # 40 * 1.6 = 64 -> 1.0 unit; 32*3 = 96 -> 1.5 units rounds to 2; 80 (1.25 units) -> 1; 2.5 units -> 2.
    assert pp.processing_size(96, 160, 1, min_size=0) == (128, 128, 160, 96)
    assert pp.processing_size(160, 96, 1, min_size=0) == (128, 128, 96, 160)
    W, H, h0, w0 = pp.processing_size(45, 30, upscale=2, min_size=64)
    assert (W, H, h0, w0) == (128, 64, 60, 90)
    assert pp.processing_size(45, 30, 3, 64, fix_resize=64) == (128, 64, 64, 96)


def test_pil_to_tensor_range_and_tensor_to_image_roundtrip():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    x, h0, w0 = pp.pil_to_tensor(img, 1, min_size=64)
    assert x.shape == (1, 64, 64, 3) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1
    back = pp.tensor_to_image(x, h0, w0)[0]
    # same size: torch bicubic is the identity, so only the float round trip (truncation) can lose 1 LSB
    assert np.abs(back.astype(int) - np.asarray(img)).max() <= 1


def test_gradio_rounding_differs_from_truncation():
    x = np.array([(100.6 - 127.5) / 127.5], np.float32)
    assert pp.tensor_to_uint8(x)[0] == 100
    assert pp.tensor_to_uint8(x, "round")[0] == 101
    with pytest.raises(ValueError):
        pp.tensor_to_uint8(x, "nearest")


def test_hwc3_and_cv2_resize_contracts():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert pp.hwc3(gray).shape == (3, 4, 3)
    with pytest.raises(ValueError):
        pp.hwc3(gray.astype(np.float32))
    img = np.full((30, 40, 3), 77, np.uint8)
    for method in ("lanczos4", "area"):  # a flat image stays flat through either resampler
        assert (pp.cv2_resize(img, 64, 48, method) == 77).all()
    with pytest.raises(ValueError, match="shrinking"):
        pp.cv2_resize(img, 20, 15, "area")
