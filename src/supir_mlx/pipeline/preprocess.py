"""The official SUPIR pre/post-processing (SUPIR/util.py), reproduced bit-for-bit in numpy.

Images are NHWC float32 in [-1, 1] on our side; the official code is NCHW torch. Resampling must match to the
last uint8 LSB, so each resampler below replays the exact arithmetic of the library the official code calls:
Pillow BICUBIC (used directly), torch `F.interpolate(mode='bicubic', align_corners=False)` and OpenCV's
fixed-point `cv2.resize` (INTER_LANCZOS4, and INTER_AREA when it enlarges). Verified against every pixel of the
reference fixtures (`supir-mlx conformance tests/reference -k preprocess`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

f32, f64 = np.float32, np.float64


def _fma(a, b, c) -> np.ndarray:
    # float32 fused multiply-add: the float32 product is exact in float64, so one float64 add then a float32
    # cast rounds like a hardware FMA except in astronomically rare double-rounding ties.
    return (np.asarray(a, f64) * np.asarray(b, f64) + np.asarray(c, f64)).astype(f32)


# ----------------------------------------------------------------------------------------------- sizes
def processing_size(width: int, height: int, upscale: float = 1, min_size: int = 1024,
                    fix_resize: int | None = None) -> tuple[int, int, int, int]:
    """(W, H, h0, w0) of `PIL2Tensor`: the multiple-of-64 working size and the size the output goes back to."""
    w, h = width * upscale, height * upscale
    w0, h0 = round(w), round(h)  # python round, before min_size
    if min(w, h) < min_size:
        s = min_size / min(w, h)
        w, h = w * s, h * s
    if fix_resize is not None:
        s = fix_resize / min(w, h)
        w, h = w * s, h * s
        w0, h0 = round(w), round(h)
    # np.round rounds half to even: 1.5 -> 2 but 2.5 -> 2, unlike python's int(x + 0.5).
    return int(np.round(w / 64.0)) * 64, int(np.round(h / 64.0)) * 64, h0, w0


def pil_to_tensor(img: Image.Image, upscale: float = 1, min_size: int = 1024,
                  fix_resize: int | None = None) -> tuple[np.ndarray, int, int]:
    """Official `PIL2Tensor`: (x [1,H,W,3] float32 in [-1,1], h0, w0)."""
    W, H, h0, w0 = processing_size(*img.size, upscale, min_size, fix_resize)
    u = np.asarray(img.convert("RGB").resize((W, H), Image.BICUBIC))
    # The official divides in float64 and only then casts to float32.
    return (u / 255 * 2 - 1).astype(f32)[None], h0, w0


def tensor_to_uint8(x: np.ndarray, rounding: str = "truncate") -> np.ndarray:
    """[-1,1] float -> uint8: test.py truncates (astype after clip); gradio_demo rounds half to even first."""
    v = np.asarray(x, f32) * f32(127.5) + f32(127.5)
    if rounding == "round":
        v = v.round()
    elif rounding != "truncate":
        raise ValueError(f"rounding must be 'truncate' or 'round', not {rounding!r}")
    return v.clip(0, 255).astype(np.uint8)


def tensor_to_image(x: np.ndarray, h0: int, w0: int) -> np.ndarray:
    """Official `Tensor2PIL`: torch bicubic back to (h0, w0), then truncation to uint8 (HWC, or NHWC in/out)."""
    return tensor_to_uint8(resize_bicubic_torch(x, h0, w0))


# ------------------------------------------------------------------------------- torch bicubic (float32)
def _torch_cubic_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Taps [n_out,4] and weights [n_out,4] of ATen's HelperInterpCubic (A = -0.75, align_corners=False).

    The official x86 torch build lets the compiler fuse some multiply-adds; this FMA pattern (source index,
    the middle step of the outer cubic, the accumulation) is the one that reproduces it bit-for-bit.
    """
    A = f32(-0.75)
    scale = f32(n_in) / f32(n_out)
    real = _fma(scale, np.arange(n_out, dtype=f32) + f32(0.5), f32(-0.5))
    idx = np.minimum(np.floor(real).astype(np.int64), n_in - 1)
    t = np.clip(real - idx.astype(f32), f32(0), f32(1)).astype(f32)

    def near(x):  # |x| <= 1
        return ((A + f32(2)) * x - (A + f32(3))) * x * x + f32(1)

    def far(x):  # 1 <= |x| <= 2
        return _fma(A * x - f32(5) * A, x, f32(8) * A) * x - f32(4) * A

    w = np.stack([far(t + f32(1)), near(t), near(f32(1) - t), far((f32(1) - t) + f32(1))], 1).astype(f32)
    taps = np.clip(idx[:, None] - 1 + np.arange(4), 0, n_in - 1)  # border pixels are replicated
    return taps, w


def _cubic_sum(values: list[np.ndarray], weights: list[np.ndarray]) -> np.ndarray:
    out = _fma(values[0], weights[0], values[1] * weights[1])
    out = _fma(values[2], weights[2], out)
    return _fma(values[3], weights[3], out)


def resize_bicubic_torch(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """`F.interpolate(x, (height, width), mode='bicubic', align_corners=False)` on HWC or NHWC float32."""
    x = np.asarray(x, f32)
    batched = x.ndim == 4
    if not batched:
        x = x[None]
    ty, wy = _torch_cubic_axis(x.shape[1], height)
    tx, wx = _torch_cubic_axis(x.shape[2], width)
    # torch interpolates each of the 4 source rows along the width, then combines the rows.
    rows = [_cubic_sum([x[:, ty[:, j]][:, :, tx[:, k]] for k in range(4)],
                       [wx[None, None, :, k, None] for k in range(4)]) for j in range(4)]
    out = _cubic_sum(rows, [wy[None, :, j, None, None] for j in range(4)])
    return out if batched else out[0]


# ---------------------------------------------------------------------------- gradio_demo helpers (cv2)
def hwc3(x: np.ndarray) -> np.ndarray:
    """Official `HWC3`: gray -> RGB, RGBA composited on white in float32 with truncation."""
    if x.dtype != np.uint8:
        raise ValueError(f"HWC3 needs uint8, got {x.dtype}")
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or x.shape[2] not in (1, 3, 4):
        raise ValueError(f"HWC3 needs H x W x 1/3/4, got shape {x.shape}")
    if x.shape[2] == 1:
        return np.concatenate([x, x, x], axis=2)
    if x.shape[2] == 3:
        return x
    color = x[:, :, :3].astype(f32)
    alpha = x[:, :, 3:4].astype(f32) / f32(255)
    return (color * alpha + f32(255) * (f32(1) - alpha)).clip(0, 255).astype(np.uint8)


def _lanczos4(x: np.float32) -> np.ndarray:
    """OpenCV interpolateLanczos4: double-precision sines, float32 normalisation."""
    s45 = 0.70710678118654752440084436210485
    cs = ((1, 0), (-s45, -s45), (0, 1), (s45, -s45), (-1, 0), (s45, s45), (0, -1), (-s45, s45))
    x3 = f32(x + f32(3))
    y0 = -float(x3) * np.pi * 0.25
    s0, c0 = np.sin(y0), np.cos(y0)
    coeffs = np.empty(8, f32)
    total = f32(0)
    for i in range(8):
        d = f32(x3 - f32(i))
        if abs(d) >= f32(1e-6):
            y = -float(d) * np.pi * 0.25
            coeffs[i] = f32((cs[i][0] * s0 + cs[i][1] * c0) / (y * y))
        else:
            coeffs[i] = f32(1e30)  # the tap under the sample point dominates after normalisation
        total = f32(total + coeffs[i])
    return coeffs * (f32(1) / total)


def _cv_axis(n_in: int, n_out: int, lanczos: bool) -> tuple[np.ndarray, np.ndarray]:
    """Taps and 11-bit fixed-point weights of OpenCV's generic resize along one axis."""
    inv = n_out / n_in
    scale = 1.0 / inv
    ksize = 8 if lanczos else 2
    taps, weights = np.empty((n_out, ksize), np.int64), np.empty((n_out, ksize), np.int64)
    for d in range(n_out):
        if lanczos:
            fx = f32((d + 0.5) * scale - 0.5)
            sx = int(np.floor(fx))
            fx = f32(fx - f32(sx))
            c = _lanczos4(fx)
        else:  # INTER_AREA when enlarging: OpenCV's bilinear variant with its own phase
            sx = int(np.floor(d * scale))
            fx = f32((d + 1) - (sx + 1) * inv)
            fx = f32(0) if fx <= 0 else f32(fx - f32(np.floor(fx)))
            if sx < 0:
                fx, sx = f32(0), 0
            if sx >= n_in - 1:
                fx, sx = f32(0), n_in - 1
            c = np.array([f32(1) - fx, fx], f32)
        weights[d] = np.rint(c * f32(2048))  # saturate_cast<short>: round half to even
        taps[d] = np.clip(sx - ksize // 2 + 1 + np.arange(ksize), 0, n_in - 1)
    return taps, weights


def cv2_resize(img: np.ndarray, width: int, height: int, interpolation: str) -> np.ndarray:
    """`cv2.resize(img, (width, height), interpolation=INTER_LANCZOS4 | INTER_AREA)` for uint8 H x W x C.

    INTER_AREA is reproduced where the official flow uses it to enlarge (either axis grows); OpenCV's true area
    averaging for a shrink on both axes is not.
    """
    if img.dtype != np.uint8 or img.ndim != 3:
        raise ValueError(f"cv2_resize needs uint8 H x W x C, got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    if (h, w) == (height, width):
        return img.copy()
    if interpolation not in ("lanczos4", "area"):
        raise ValueError(f"interpolation must be 'lanczos4' or 'area', not {interpolation!r}")
    lanczos = interpolation == "lanczos4"
    if not lanczos and width <= w and height <= h:
        raise ValueError("INTER_AREA shrinking on both axes is not reproduced; only enlarging is")
    tx, ax = _cv_axis(w, width, lanczos)
    ty, ay = _cv_axis(h, height, lanczos)
    rows = np.einsum("hwkc,wk->hwc", img.astype(np.int64)[:, tx], ax)  # integer horizontal pass
    if lanczos:
        acc = np.einsum("hkwc,hk->hwc", rows[ty], ay)
        out = (acc + (1 << 21)) >> 22
    else:  # the 8-bit linear kernel pre-shifts both operands (it is built around 16-bit SIMD multiplies)
        s0, s1 = rows[ty[:, 0]] >> 4, rows[ty[:, 1]] >> 4
        out = (((ay[:, 0, None, None] * s0) >> 16) + ((ay[:, 1, None, None] * s1) >> 16) + 2) >> 2
    return out.clip(0, 255).astype(np.uint8)


def _unit_size(h: float, w: float, unit: int) -> tuple[int, int]:
    return int(np.round(h / unit)) * unit, int(np.round(w / unit)) * unit


def upscale_image(img: np.ndarray, upscale: float, min_size: int | None = None,
                  unit_resolution: int = 64) -> np.ndarray:
    """gradio_demo `upscale_image`: LANCZOS4 when the upscale ARGUMENT is > 1, else INTER_AREA."""
    h, w = float(img.shape[0]) * upscale, float(img.shape[1]) * upscale
    if min_size is not None and min(h, w) < min_size:
        s = min_size / min(w, h)
        h, w = h * s, w * s
    H, W = _unit_size(h, w, unit_resolution)
    return cv2_resize(img, W, H, "lanczos4" if upscale > 1 else "area")


def fix_resize(img: np.ndarray, size: int = 512, unit_resolution: int = 64) -> np.ndarray:
    """gradio_demo `fix_resize`: short side to `size`, LANCZOS4 when that enlarges, else INTER_AREA."""
    h, w = float(img.shape[0]), float(img.shape[1])
    s = size / min(h, w)
    H, W = _unit_size(h * s, w * s, unit_resolution)
    return cv2_resize(img, W, H, "lanczos4" if s > 1 else "area")
