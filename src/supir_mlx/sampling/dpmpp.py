"""Restoration DPM++ 2M SDE (official RestoreDPMPP2MSampler, the sampler of the Lightning yaml).

DPM-Solver++(2M) with an SDE noise term (eta), in the half-log-SNR variable t = -log(sigma), on Karras
sigmas (schedules.dpmpp_sigmas). Unlike k-diffusion's sample_dpmpp_2m_sde it adds no noise at the first
step, and like the official sampler it has no restoration guidance, no churn and a constant control scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from .denoiser import DenoiseFn, Window
from .noise import NoiseSource
from .schedules import SamplerOptions, rounded

NAN = np.float32("nan")


@dataclass(frozen=True)
class DPMCoefficients:
    """The official get_variables / get_mult values of one step (float32; NaN where absent)."""

    h: np.float32  # t_next - t; inf at the last step
    r: np.float32  # (t - t_prev) / h, from the second step on
    mult1: np.float32  # exp(-t_next) / exp(-t) * exp(-eta h)
    mult2: np.float32  # expm1(-h - eta h)
    mult3: np.float32  # 1 + 1 / (2 r)
    mult4: np.float32  # 1 / (2 r)
    noise: np.float32  # sqrt(-expm1(-2 eta h)): noise std per unit of sigma_next


def dpmpp_coefficients(sigmas: np.ndarray, i: int, eta: float) -> DPMCoefficients:
    """Step i's coefficients, float32 operation by operation as the official tensors compute them."""
    f = np.float32
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        t, t_next = -rounded(np.log, sigmas[i]), -rounded(np.log, sigmas[i + 1])
        h = t_next - t
        eta_h = f(eta) * h
        mult1 = rounded(np.exp, -t_next) / rounded(np.exp, -t) * rounded(np.exp, -eta_h)
        mult2 = rounded(np.expm1, -h - eta_h)
        r = mult3 = mult4 = NAN
        if i > 0:
            r = (t - -rounded(np.log, sigmas[i - 1])) / h
            mult4 = f(1.0) / (f(2.0) * r)
            mult3 = f(1.0) + mult4
        noise = np.sqrt(-rounded(np.expm1, f(-2.0) * eta_h))
    return DPMCoefficients(h, r, mult1, mult2, mult3, mult4, noise)


@dataclass
class DPMStep:
    """Everything one step computed, for callbacks (progress, inspection, the fixtures' per-step tensors)."""

    index: int
    sigma: np.float32
    next_sigma: np.float32
    previous_sigma: np.float32  # NaN at the first step
    coefficients: DPMCoefficients
    cfg_scale: np.float32
    control_scale: float
    x_in: mx.array
    old_denoised: mx.array | None  # the previous step's denoised (blended, when tiled)
    uncond: mx.array
    cond: mx.array
    denoised: mx.array  # after CFG: the next step's old_denoised
    x_out: mx.array
    noise_used: bool
    window: Window | None = None
    tile: int | None = None


def draws_noise(sigmas: np.ndarray, i: int) -> bool:
    """The official sampler draws Brownian noise before every step but the first and the last (even if eta = 0)."""
    return i > 0 and sigmas[i + 1] > 0


def check_noise(noise: NoiseSource | None, sigmas: np.ndarray) -> None:
    if noise is None and any(draws_noise(sigmas, i) for i in range(len(sigmas) - 1)):
        raise ValueError("the DPM++ SDE sampler needs a noise source (3 steps or more)")


def dpmpp_step(
    denoise: DenoiseFn,
    x: mx.array,
    old_denoised: mx.array | None,
    sigmas: np.ndarray,
    i: int,
    options: SamplerOptions,
    eps: mx.array | None = None,
    window: Window | None = None,
) -> DPMStep:
    """Step i of the restoration DPM++ 2M SDE on x (a whole latent or one tile; old_denoised, eps cut alike)."""
    sigma, next_sigma = np.float32(sigmas[i]), np.float32(sigmas[i + 1])
    k = dpmpp_coefficients(sigmas, i, options.eta)
    uncond, cond = denoise(x, float(sigma), options.control_scale, window)
    cfg_scale = options.cfg_scale(sigma)
    denoised = uncond + float(cfg_scale) * (cond - uncond)
    noise_used = False
    if next_sigma == 0:
        # Officially mult1 x - mult2 denoised with mult1 = 0, mult2 = -1: exactly denoised for eta > 0,
        # NaN (0 * inf) for eta = 0. Returning denoised is the same result without the NaN.
        x_out = denoised
    elif old_denoised is None:
        x_out = float(k.mult1) * x - float(k.mult2) * denoised
    else:
        x_out = float(k.mult1) * x - float(k.mult2) * (float(k.mult3) * denoised - float(k.mult4) * old_denoised)
        if options.eta:
            x_out = x_out + eps * float(next_sigma) * float(k.noise) * options.s_noise
            noise_used = True
    previous = np.float32(sigmas[i - 1]) if i > 0 else NAN
    return DPMStep(
        i, sigma, next_sigma, previous, k, cfg_scale, options.control_scale,
        x, old_denoised, uncond, cond, denoised, x_out, noise_used, window,
    )


def sample_restore_dpmpp(
    denoise: DenoiseFn,
    x: mx.array,
    sigmas: np.ndarray,
    options: SamplerOptions,
    noise: NoiseSource | None = None,
    callback: Callable[[DPMStep], None] | None = None,
) -> mx.array:
    """Sample from x = N(0, 1) noise * initial_noise_scale() along `sigmas` (dpmpp_sigmas(steps)).

    `noise` stands in for the Brownian tree: one draw before each step 1..n-2 (see noise.py).
    """
    check_noise(noise, sigmas)
    old_denoised = None
    for i in range(len(sigmas) - 1):
        eps = noise.next(x.shape, x.dtype) if draws_noise(sigmas, i) else None
        step = dpmpp_step(denoise, x, old_denoised, sigmas, i, options, eps)
        x, old_denoised = step.x_out, step.denoised
        mx.eval(x, old_denoised)
        if callback is not None:
            callback(step)
    return x
