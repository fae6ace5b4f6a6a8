"""Tiled sampling: each step runs on overlapping latent tiles, blended with Gaussian weights.

The official TiledRestoreEDMSampler / TiledRestoreDPMPP2MSampler semantics: windows from
`_sliding_windows`, every tile runs a full sampler step on its slices (x, noise, control latent, x_center
or old_denoised), and the step's result is sum(w * tile) / sum(w). Peak activation memory is that of one
tile, whatever the image size; the price is that every latent pixel is denoised by up to 4 tiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from .denoiser import DenoiseFn, Window, crop
from .dpmpp import DPMStep, check_noise, dpmpp_step, draws_noise
from .edm import EDMStep, check_inputs, churn_gamma, edm_step
from .noise import NoiseSource
from .schedules import SamplerOptions

# Official defaults: 128 latent pixels (1024 image pixels) with half-tile overlap.
DEFAULT_TILE = 128
DEFAULT_STRIDE = 64
# Tiles stay a multiple of this so the UNet's downsampling (at most 8x in latent space) divides them.
TILE_MULTIPLE = 8


@dataclass(frozen=True)
class Tiling:
    size: int = DEFAULT_TILE  # latent pixels
    stride: int = DEFAULT_STRIDE

    def __post_init__(self):
        if self.size < 1 or not 0 < self.stride <= self.size:
            raise ValueError(f"tile size {self.size} / stride {self.stride}: need size >= 1 and 0 < stride <= size")

    def tile_shape(self, h: int, w: int) -> tuple[int, int]:
        """Square official tiles; a latent thinner than a tile gets tiles of its own thickness."""
        return min(self.size, h), min(self.size, w)

    def windows(self, h: int, w: int) -> list[Window]:
        """The official `_sliding_windows`: steps of `stride`, plus a last window flush with the far edge."""
        th, tw = self.tile_shape(h, w)

        def starts(n: int, t: int) -> list[int]:
            s = list(range(0, n - t + 1, self.stride))
            if (n - t) % self.stride:
                s.append(n - t)
            return s

        return [(hi, hi + th, wi, wi + tw) for hi in starts(h, th) for wi in starts(w, tw)]

    def weights(self, h: int, w: int) -> np.ndarray:
        """The official `gaussian_weights` of one tile, float64 [th, tw].

        Officially the column midpoint is (tw - 1) / 2 but the row midpoint th / 2 (kept: it moves the
        blend by half a pixel vertically and the fixtures pin it).
        """
        th, tw = self.tile_shape(h, w)
        var = 0.01

        def profile(n: int, mid: float) -> np.ndarray:
            u = np.arange(n, dtype=np.float64)
            return np.exp(-(u - mid) * (u - mid) / (n * n) / (2 * var)) / np.sqrt(2 * np.pi * var)

        return np.outer(profile(th, th / 2), profile(tw, (tw - 1) / 2))


def auto_tiling(latent_h: int, latent_w: int, max_tile: int = DEFAULT_TILE) -> Tiling | None:
    """The tiling to sample a latent with: None when it fits in one tile (sample it whole, untiled),
    else tiles of max_tile (rounded down to a multiple of TILE_MULTIPLE) with half-tile stride.

    The memory planner lowers max_tile from the official 128 when one tile's activations do not fit.
    """
    size = max(TILE_MULTIPLE, max_tile // TILE_MULTIPLE * TILE_MULTIPLE)
    if latent_h <= size and latent_w <= size:
        return None
    return Tiling(size, size // 2)


@dataclass
class TiledStep:
    """One whole step after blending the tiles."""

    index: int
    x_in: mx.array
    x_out: mx.array
    denoised: mx.array  # the blended denoised estimate (DPM++: what the next step's tiles read as old_denoised)


class _Blender:
    """sum(w * tile) / sum(w) over a step's tiles.

    The official weights are float64 and each product w * tile is rounded once into a float32 buffer;
    MLX has no float64 on the GPU, so here the product is float32 (at most one extra rounding,
    ~6e-8 relative, far below the sampler tolerance). The weight sum does not depend on the data: it is
    accumulated once, in numpy, exactly as officially (float64 adds rounded into float32).
    """

    def __init__(self, tiling: Tiling, shape: tuple[int, ...], dtype: mx.Dtype):
        _, h, w, _ = shape
        self.windows = tiling.windows(h, w)
        w64 = tiling.weights(h, w)
        count = np.zeros((h, w), np.float32)
        for h0, h1, w0, w1 in self.windows:
            count[h0:h1, w0:w1] = (count[h0:h1, w0:w1] + w64).astype(np.float32)
        self.weights = mx.array(w64.astype(np.float32))[None, :, :, None].astype(dtype)
        self.count = mx.array(count)[None, :, :, None].astype(dtype)

    def add(self, acc: mx.array, window: Window, tile: mx.array) -> mx.array:
        h0, h1, w0, w1 = window
        acc[:, h0:h1, w0:w1, :] += tile * self.weights
        return acc


def sample_tiled_restore_edm(
    denoise: DenoiseFn,
    x: mx.array,
    sigmas: np.ndarray,
    options: SamplerOptions,
    tiling: Tiling,
    x_center: mx.array | None = None,
    noise: NoiseSource | None = None,
    callback: Callable[[TiledStep], None] | None = None,
    tile_callback: Callable[[EDMStep], None] | None = None,
) -> mx.array:
    """Tiled restoration EDM (TiledRestoreEDMSampler). `denoise` gets each tile's window.

    Officially one full-size draw is made every step, even without churn; it is made whenever a noise
    source is given, so replayed official draws line up.
    """
    steps = len(sigmas) - 1
    gamma = churn_gamma(options.s_churn, steps)
    check_inputs(options, x_center, noise, gamma)
    blend = _Blender(tiling, x.shape, x.dtype)
    for i in range(steps):
        eps = noise.next(x.shape, x.dtype) if noise is not None else None
        acc, acc_d = mx.zeros_like(x), mx.zeros_like(x)
        for j, win in enumerate(blend.windows):
            step = edm_step(
                denoise, crop(x, win), sigmas[i], sigmas[i + 1], gamma, options, crop(x_center, win), crop(eps, win), i, win
            )
            step.tile = j
            acc = blend.add(acc, win, step.x_out)
            # the blended x0 only feeds step callbacks (a live preview); the sampler itself does not read it
            if callback is not None:
                acc_d = blend.add(acc_d, win, step.denoised)
            mx.eval(acc, acc_d)
            if tile_callback is not None:
                tile_callback(step)
        x_next = acc / blend.count
        mx.eval(x_next)
        if callback is not None:
            callback(TiledStep(i, x, x_next, acc_d / blend.count))
        x = x_next
    return x


def sample_tiled_restore_dpmpp(
    denoise: DenoiseFn,
    x: mx.array,
    sigmas: np.ndarray,
    options: SamplerOptions,
    tiling: Tiling,
    noise: NoiseSource | None = None,
    callback: Callable[[TiledStep], None] | None = None,
    tile_callback: Callable[[DPMStep], None] | None = None,
) -> mx.array:
    """Tiled restoration DPM++ 2M SDE (TiledRestoreDPMPP2MSampler).

    One full-size noise draw per step 1..n-2, sliced per tile. Both x and denoised are blended: the
    next step's tiles read their old_denoised from the BLENDED denoised, not from their own.
    """
    check_noise(noise, sigmas)
    blend = _Blender(tiling, x.shape, x.dtype)
    old_denoised = None
    for i in range(len(sigmas) - 1):
        eps = noise.next(x.shape, x.dtype) if draws_noise(sigmas, i) else None
        acc_x, acc_d = mx.zeros_like(x), mx.zeros_like(x)
        for j, win in enumerate(blend.windows):
            step = dpmpp_step(denoise, crop(x, win), crop(old_denoised, win), sigmas, i, options, crop(eps, win), win)
            step.tile = j
            acc_x = blend.add(acc_x, win, step.x_out)
            acc_d = blend.add(acc_d, win, step.denoised)
            mx.eval(acc_x, acc_d)
            if tile_callback is not None:
                tile_callback(step)
        x_next, old_denoised = acc_x / blend.count, acc_d / blend.count
        mx.eval(x_next, old_denoised)
        if callback is not None:
            callback(TiledStep(i, x, x_next, old_denoised))
        x = x_next
    return x
