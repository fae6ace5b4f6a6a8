"""Colour correction of the restored image toward the stage-1 image (official SUPIR/utils/colorfix.py).

Both functions take NHWC arrays; `content` is the generated image, `style` the stage-1 image
whose colours are kept. Nothing is clamped, like the official pipeline output.
"""

from __future__ import annotations

import mlx.core as mx

WAVELET_LEVELS = 5
HALO = sum(2**i for i in range(WAVELET_LEVELS))  # 31 rows: how far the blurs of all levels reach
BAND_ROWS = 256
ADAIN_EPS = 1e-5


def _check(content: mx.array, style: mx.array) -> None:
    if content.ndim != 4 or style.ndim != 4:
        raise ValueError(f"colour fix needs NHWC images, got shapes {tuple(content.shape)} and {tuple(style.shape)}")
    if content.shape[-1] != style.shape[-1]:
        raise ValueError(f"colour fix needs the same channels, got {content.shape[-1]} and {style.shape[-1]}")


def _blur_axis(x: mx.array, radius: int, axis: int) -> mx.array:
    """[1, 2, 1] / 4 with taps `radius` apart along `axis`, edges replicated."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    xp = mx.pad(x, pad, mode="edge")
    n = x.shape[axis]

    def tap(start: int) -> mx.array:
        index = [slice(None)] * x.ndim
        index[axis] = slice(start, start + n)
        return xp[tuple(index)]

    return _weighted_taps(tap(0), tap(radius), tap(2 * radius))


@mx.compile
def _weighted_taps(a: mx.array, b: mx.array, c: mx.array) -> mx.array:
    return 0.25 * a + 0.5 * b + 0.25 * c  # one pass, no image-sized products in between


def wavelet_blur(x: mx.array, radius: int) -> mx.array:
    """The official 3x3 kernel [[1,2,1],[2,4,2],[1,2,1]]/16 dilated by `radius` (it is separable)."""
    return _blur_axis(_blur_axis(x, radius, 1), radius, 2)


def wavelet_decomposition(x: mx.array, levels: int = WAVELET_LEVELS) -> tuple[mx.array, mx.array]:
    """(high, low): the sum of the residuals of `levels` blurs of radius 2^i, and the last blur."""
    high = None
    for i in range(levels):
        low = wavelet_blur(x, 2**i)
        high = x - low if high is None else high + (x - low)  # the official's running sum, in its order
        # One level at a time: the lazy graph of every level at once held ~30 image-sized arrays at its peak.
        mx.eval(high, low)
        x = low
    return high, x


def wavelet_color_fix(content: mx.array, style: mx.array) -> mx.array:
    """Fine detail of `content` on the coarse colours of `style` (the official default, 'Wavelet')."""
    _check(content, style)
    if content.shape != style.shape:
        raise ValueError(f"wavelet colour fix needs equal shapes, got {tuple(content.shape)} and {tuple(style.shape)}")
    # In bands of rows, each read with HALO rows either side: where a band is cut inside the image, its edge
    # replication makes the blurs wrong for fewer than HALO rows, so the rows kept are exactly the whole image's
    # (at the image's own edges the band's edge is the image's). The work then holds a band's arrays, not the
    # image's: a 4096-px output's colour fix would otherwise hold about 12 image-sized arrays (2.4 GB).
    h = content.shape[1]
    parts = []
    for r0 in range(0, h, BAND_ROWS):
        r1 = min(r0 + BAND_ROWS, h)
        a, b = max(r0 - HALO, 0), min(r1 + HALO, h)
        band = wavelet_decomposition(content[:, a:b])[0] + wavelet_decomposition(style[:, a:b])[1]
        parts.append(band[:, r0 - a : r1 - a])
        mx.eval(parts[-1])
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)


def _mean_std(x: mx.array) -> tuple[mx.array, mx.array]:
    mean = mx.mean(x, axis=(1, 2), keepdims=True)
    var = mx.var(x, axis=(1, 2), keepdims=True, ddof=1)  # torch.var is unbiased
    return mean, mx.sqrt(var + ADAIN_EPS)


def adain_color_fix(content: mx.array, style: mx.array) -> mx.array:
    """Per-channel mean and std of `content` replaced by those of `style` ('AdaIn')."""
    _check(content, style)
    c_mean, c_std = _mean_std(content)
    s_mean, s_std = _mean_std(style)
    return (content - c_mean) / c_std * s_std + s_mean
