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

from ..distributed import all_sum
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

    With a distributed group (several processes started by mlx.launch) each rank runs every size-th tile; the
    weighted tiles travel to every rank in one all_sum over a stack in which each tile is non-zero on one rank
    only (x + 0 is exact), and every rank then accumulates them in window order as a single process does: the
    result is bit-identical to the single-process one. Per step that moves tiles x tile_h x tile_w x channels
    floats per blended quantity (`exchanged_bytes`).
    """

    def __init__(self, tiling: Tiling, shape: tuple[int, ...], dtype: mx.Dtype, group=None):
        _, h, w, _ = shape
        self.shape, self.dtype = shape, dtype
        self.windows = tiling.windows(h, w)
        w64 = tiling.weights(h, w)
        count = np.zeros((h, w), np.float32)
        for h0, h1, w0, w1 in self.windows:
            count[h0:h1, w0:w1] = (count[h0:h1, w0:w1] + w64).astype(np.float32)
        self.weights = mx.array(w64.astype(np.float32))[None, :, :, None].astype(dtype)
        self.count = mx.array(count)[None, :, :, None].astype(dtype)
        self.group = group if group is not None and group.size() > 1 else None

    def mine(self) -> list[int]:
        """The windows this process runs (all of them without a group)."""
        if self.group is None:
            return list(range(len(self.windows)))
        return list(range(self.group.rank(), len(self.windows), self.group.size()))

    def step(self, run: Callable[[int, Window], tuple[object, tuple[mx.array, ...]]],
             tile_callback: Callable | None) -> list[mx.array]:
        """One step: `run(j, window)` -> (step record, tile outputs) on this process's tiles; returns the
        weighted sum over all tiles of each output (divide by `count`)."""
        if self.group is None:
            accs = None
            for j, win in enumerate(self.windows):
                record, outs = run(j, win)
                h0, h1, w0, w1 = win
                accs = accs or [mx.zeros(self.shape, self.dtype) for _ in outs]
                for acc, out in zip(accs, outs):
                    acc[:, h0:h1, w0:w1, :] += out * self.weights
                mx.eval(accs)
                if tile_callback is not None:
                    tile_callback(record)
            return accs
        weighted: dict[int, list[mx.array]] = {}
        for j in self.mine():
            record, outs = run(j, self.windows[j])
            weighted[j] = [out * self.weights for out in outs]
            mx.eval(weighted[j])
            if tile_callback is not None:
                tile_callback(record)
        n_out = len(next(iter(weighted.values())))
        zero = mx.zeros_like(next(iter(weighted.values()))[0])
        stack = mx.stack([mx.stack([weighted[j][k] if j in weighted else zero for j in range(len(self.windows))])
                          for k in range(n_out)])
        everyone = all_sum(stack, self.group)
        accs = [mx.zeros(self.shape, self.dtype) for _ in range(n_out)]
        for j, (h0, h1, w0, w1) in enumerate(self.windows):
            for k, acc in enumerate(accs):
                acc[:, h0:h1, w0:w1, :] += everyone[k, j]
        mx.eval(accs)
        return accs

    def exchanged_bytes(self, quantities: int) -> int:
        """Bytes each all_sum of a step reduces (the stacked tiles of `quantities` blended arrays)."""
        b, _, _, c = self.shape
        th, tw = self.weights.shape[1:3]
        return quantities * len(self.windows) * b * th * tw * c * self.weights.dtype.size


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
    group=None,
) -> mx.array:
    """Tiled restoration EDM (TiledRestoreEDMSampler). `denoise` gets each tile's window.

    Officially one full-size draw is made every step, even without churn; it is made whenever a noise
    source is given, so replayed official draws line up. `group` (mx.distributed) divides each step's tiles
    among processes; every process gets the same result.
    """
    steps = len(sigmas) - 1
    gamma = churn_gamma(options.s_churn, steps)
    check_inputs(options, x_center, noise, gamma)
    blend = _Blender(tiling, x.shape, x.dtype, group)
    for i in range(steps):
        eps = noise.next(x.shape, x.dtype) if noise is not None else None

        def run(j, win):
            step = edm_step(
                denoise, crop(x, win), sigmas[i], sigmas[i + 1], gamma, options, crop(x_center, win), crop(eps, win), i, win
            )
            step.tile = j
            # the blended x0 only feeds step callbacks (a live preview); the sampler itself does not read it
            return step, (step.x_out, step.denoised) if callback is not None else (step.x_out,)

        blended = blend.step(run, tile_callback)
        x_next = blended[0] / blend.count
        mx.eval(x_next)
        if callback is not None:
            callback(TiledStep(i, x, x_next, blended[1] / blend.count))
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
    group=None,
) -> mx.array:
    """Tiled restoration DPM++ 2M SDE (TiledRestoreDPMPP2MSampler).

    One full-size noise draw per step 1..n-2, sliced per tile. Both x and denoised are blended: the
    next step's tiles read their old_denoised from the BLENDED denoised, not from their own. `group` as for
    the EDM sampler.
    """
    check_noise(noise, sigmas)
    blend = _Blender(tiling, x.shape, x.dtype, group)
    old_denoised = None
    for i in range(len(sigmas) - 1):
        eps = noise.next(x.shape, x.dtype) if draws_noise(sigmas, i) else None

        def run(j, win):
            step = dpmpp_step(denoise, crop(x, win), crop(old_denoised, win), sigmas, i, options, crop(eps, win), win)
            step.tile = j
            return step, (step.x_out, step.denoised)

        acc_x, acc_d = blend.step(run, tile_callback)
        x_next, old_denoised = acc_x / blend.count, acc_d / blend.count
        mx.eval(x_next, old_denoised)
        if callback is not None:
            callback(TiledStep(i, x, x_next, old_denoised))
        x = x_next
    return x
