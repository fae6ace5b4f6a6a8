"""Restoration-guided EDM sampling (official RestoreEDMSampler, SUPIR's default sampler).

Euler steps with churn (Karras et al. 2022, Alg. 2 without the Heun correction), classifier-free
guidance on a linear ramp evaluated at sigma_hat, an optionally ramped control scale evaluated at
sigma_i, and restoration guidance that pulls the denoised estimate toward the stage-1 latent x_center
by (sigma_i / RAMP_SIGMA) ** restore_cfg, strongest at high noise.

Per-step scalars are float32 numpy values (the official float32 tensors); tensors are NHWC MLX arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from .denoiser import DenoiseFn, Window
from .noise import NoiseSource
from .schedules import RAMP_SIGMA, SamplerOptions

# Restoration guidance is skipped once the next sigma is at or below this (restore_cfg_s_tmin).
RESTORE_MIN_SIGMA = 0.05


@dataclass
class EDMStep:
    """Everything one step computed, for callbacks (progress, inspection, the fixtures' per-step tensors)."""

    index: int
    sigma: np.float32
    next_sigma: np.float32
    sigma_hat: np.float32
    gamma: float
    cfg_scale: np.float32
    control_scale: float
    x_in: mx.array
    x_churned: mx.array  # the network input: x_in plus churn noise
    uncond: mx.array  # denoiser output of the negative branch
    cond: mx.array  # denoiser output of the positive branch
    denoised: mx.array  # after CFG, before restoration guidance
    x_out: mx.array
    window: Window | None = None  # the tile (tiled sampling)
    tile: int | None = None


def churn_gamma(s_churn: float, steps: int) -> float:
    """The official gamma, the same at every step (s_tmin = 0, s_tmax = inf)."""
    return min(s_churn / steps, 2**0.5 - 1)


def edm_step(
    denoise: DenoiseFn,
    x: mx.array,
    sigma: np.float32,
    next_sigma: np.float32,
    gamma: float,
    options: SamplerOptions,
    x_center: mx.array | None = None,
    eps: mx.array | None = None,
    index: int = 0,
    window: Window | None = None,
) -> EDMStep:
    """One restoration EDM step on x (a whole latent or one tile; x_center, eps cut alike)."""
    sigma, next_sigma = np.float32(sigma), np.float32(next_sigma)
    sigma_hat = sigma * np.float32(gamma + 1.0)
    x_churned = x
    if gamma > 0:
        std = np.sqrt(sigma_hat * sigma_hat - sigma * sigma)
        x_churned = x + (eps * options.s_noise) * float(std)
    control_scale = options.control_scale_at(sigma)
    uncond, cond = denoise(x_churned, float(sigma_hat), control_scale, window)
    cfg_scale = options.cfg_scale(sigma_hat)
    denoised = uncond + float(cfg_scale) * (cond - uncond)
    guided = denoised
    if next_sigma > RESTORE_MIN_SIGMA and options.restore_cfg > 0:
        pull = np.power(sigma / np.float32(RAMP_SIGMA), np.float32(options.restore_cfg), dtype=np.float32)
        guided = denoised - (denoised - x_center) * float(pull)
    d = (x_churned - guided) / float(sigma_hat)
    x_out = x_churned + float(next_sigma - sigma_hat) * d
    return EDMStep(
        index, sigma, next_sigma, sigma_hat, gamma, cfg_scale, control_scale,
        x, x_churned, uncond, cond, denoised, x_out, window,
    )


def check_inputs(options: SamplerOptions, x_center: mx.array | None, noise: NoiseSource | None, gamma: float) -> None:
    if options.restore_cfg > 0 and x_center is None:
        raise ValueError("restoration guidance (restore_cfg > 0) needs x_center, the stage-1 latent")
    if gamma > 0 and noise is None:
        raise ValueError("churn (s_churn > 0) needs a noise source")


def sample_restore_edm(
    denoise: DenoiseFn,
    x: mx.array,
    sigmas: np.ndarray,
    options: SamplerOptions,
    x_center: mx.array | None = None,
    noise: NoiseSource | None = None,
    callback: Callable[[EDMStep], None] | None = None,
) -> mx.array:
    """Sample from x = N(0, 1) noise * initial_noise_scale() along `sigmas` (legacy_sigmas(steps)).

    One churn draw per step when s_churn > 0 (the official RNG order); none otherwise.
    """
    steps = len(sigmas) - 1
    gamma = churn_gamma(options.s_churn, steps)
    check_inputs(options, x_center, noise, gamma)
    for i in range(steps):
        eps = noise.next(x.shape, x.dtype) if gamma > 0 else None
        step = edm_step(denoise, x, sigmas[i], sigmas[i + 1], gamma, options, x_center, eps, i)
        x = step.x_out
        mx.eval(x)
        if callback is not None:
            callback(step)
    return x
