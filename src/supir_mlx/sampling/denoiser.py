"""The discrete eps-prediction denoiser (official DiscreteDenoiserWithControl + EpsScaling) and CFG batching.

The sampler works with continuous sigmas; the networks were trained on 1000 DDPM timesteps, so every
sigma is snapped to the nearest entry of the DDPM table, whose index is the timestep both networks get
and whose value gives the input/output scalings. The sampler's own arithmetic keeps the raw sigma.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

import mlx.core as mx
import numpy as np

from .schedules import ddpm_sigmas

# (h0, h1, w0, w1) latent rows/columns of a tile, the official `_sliding_windows` tuple.
Window = tuple[int, int, int, int]


class Network(Protocol):
    """models.supir.ControlledUNet: eps for an input already scaled by c_in, at DDPM timesteps."""

    def __call__(self, x: mx.array, timesteps: mx.array, cond, control_scale: float) -> mx.array: ...


@dataclass(frozen=True, eq=False)
class Denoiser:
    """DiscreteDenoiserWithControl with EpsScaling: the scalings are host-side float32 numpy, as officially."""

    sigmas: np.ndarray = field(default_factory=ddpm_sigmas)  # float32, ascending; index = DDPM timestep

    def index(self, sigma) -> np.ndarray:
        """Nearest table entry (ties go to the lower index, like torch.argmin)."""
        sigma = np.asarray(sigma, dtype=np.float32)
        return np.abs(sigma[..., None] - self.sigmas).argmin(axis=-1)

    def quantize(self, sigma) -> np.ndarray:
        return self.sigmas[self.index(sigma)]

    def scalings(self, sigma) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(c_skip, c_out, c_in) of eps prediction at the quantized sigma: out = c_skip x + c_out eps(c_in x)."""
        s = self.quantize(sigma)
        c_in = np.float32(1.0) / np.sqrt(s * s + np.float32(1.0))
        return np.ones_like(s), -s, c_in

    def __call__(self, network: Network, x: mx.array, sigma, cond, control_scale: float) -> mx.array:
        """Denoised x (NHWC) at sigma (a scalar or one per sample). The result is float32 whatever the
        network's dtype: the samplers keep the latent in float32."""
        sigma = np.broadcast_to(np.asarray(sigma, dtype=np.float32), (x.shape[0],))
        c_skip, c_out, c_in = (mx.array(c).reshape(-1, 1, 1, 1) for c in self.scalings(sigma))
        t = mx.array(self.index(sigma).astype(np.int32))
        return network(x * c_in, t, cond, control_scale) * c_out + x * c_skip


DENOISER = Denoiser()

# (x, sigma, control_scale, window) -> (uncond_out, cond_out): both CFG branches of the denoiser output.
# `window` names the tile x was cut from (None: the whole latent), so the control latent can be cut alike.
DenoiseFn = Callable[[mx.array, float, float, "Window | None"], tuple[mx.array, mx.array]]


def _concat(a, b):
    return replace(
        a,
        crossattn=mx.concatenate([a.crossattn, b.crossattn]),
        vector=mx.concatenate([a.vector, b.vector]),
        control=mx.concatenate([a.control, b.control]),
    )


def denoise(
    network: Network,
    x: mx.array,
    sigma: float,
    cond,
    uncond,
    control_scale: float,
    denoiser: Denoiser = DENOISER,
    batched: bool = True,
) -> tuple[mx.array, mx.array]:
    """Denoised x for the unconditional and the conditional branch (in that order), x NHWC.

    batched=True runs one network call on [uncond, cond] like the official guider; batched=False runs
    two calls and evaluates the first before starting the second, which halves the peak activation
    memory and gives the same numbers.
    """
    if batched:
        out = denoiser(network, mx.concatenate([x, x]), sigma, _concat(uncond, cond), control_scale)
        return out[: x.shape[0]], out[x.shape[0] :]
    out_uc = denoiser(network, x, sigma, uncond, control_scale)
    mx.eval(out_uc)
    return out_uc, denoiser(network, x, sigma, cond, control_scale)


def crop(a: mx.array | None, window: Window | None) -> mx.array | None:
    """The tile of an NHWC latent (None: no tile, the whole latent)."""
    if a is None or window is None:
        return a
    h0, h1, w0, w1 = window
    return a[:, h0:h1, w0:w1, :]


def crop_condition(cond, window: Window | None):
    """The condition of one tile: only the control latent is spatial."""
    return cond if window is None else replace(cond, control=crop(cond.control, window))


def guided_denoiser(
    network: Network, cond, uncond, denoiser: Denoiser = DENOISER, batched: bool = True
) -> DenoiseFn:
    """The DenoiseFn the samplers call: `denoise` with fixed conditions, cut to the tile being sampled."""

    def fn(x: mx.array, sigma: float, control_scale: float, window: Window | None = None):
        return denoise(
            network, x, sigma, crop_condition(cond, window), crop_condition(uncond, window), control_scale,
            denoiser, batched,
        )

    return fn
