"""Before/after comparison image for `--compare`: the input (resized to the output size) | the output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .images import save_image


def compare_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(f"{output.stem}_compare{output.suffix}")


def side_by_side(before: np.ndarray, after: np.ndarray, *, divider: int = 4,
                 labels: tuple[str, str] | None = ("before", "after (generative reconstruction)")) -> np.ndarray:
    """H x (2W + divider) x 3 uint8: `before` resized (Lanczos) to `after`'s size, a white divider, `after`."""
    after8 = _u8(after)
    h, w = after8.shape[:2]
    before8 = np.asarray(Image.fromarray(_u8(before), "RGB").resize((w, h), Image.LANCZOS))
    canvas = np.full((h, 2 * w + divider, 3), 255, np.uint8)
    canvas[:, :w], canvas[:, w + divider:] = before8, after8
    if labels:
        im = Image.fromarray(canvas)
        draw = ImageDraw.Draw(im)
        font = ImageFont.load_default(size=max(10, h // 40))
        for x0, text in ((0, labels[0]), (w + divider, labels[1])):
            box = draw.textbbox((x0 + 8, 8), text, font=font)
            draw.rectangle((box[0] - 4, box[1] - 4, box[2] + 4, box[3] + 4), fill=(0, 0, 0))
            draw.text((x0 + 8, 8), text, fill=(255, 255, 255), font=font)
        canvas = np.asarray(im)
    return canvas


def _u8(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    if x.dtype == np.uint16:
        return (x.astype(np.float32) / 257).round().astype(np.uint8)
    return (np.asarray(x, np.float32).clip(0, 1) * 255).round().astype(np.uint8)


def write_compare(output: str | Path, before: np.ndarray, after: np.ndarray, *, provenance: dict | None = None,
                  overwrite: bool = False, **kw) -> Path:
    """Write the comparison next to `output` as `<stem>_compare<ext>` (8-bit, atomically)."""
    path = compare_path(output)
    return save_image(path, side_by_side(before, after, **kw), provenance=provenance, overwrite=overwrite)
