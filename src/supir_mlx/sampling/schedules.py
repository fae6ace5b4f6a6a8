"""Noise schedules and the per-step scale formulas of the official samplers.

Everything here is host-side scalar math on numpy, done in the precision the official code uses
(float64 DDPM tables, float32 tensors after that), so the samplers see the official sigmas to the bit
(rarely one float32 ulp off, where torch's vectorised kernels round differently).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The official code normalises sigma by this literal (LinearCFG, the linear control scale, restoration
# guidance), not by the actual largest sigma 14.614641: the ramps are a hair off their end values.
RAMP_SIGMA = 14.6146

NUM_TIMESTEPS = 1000
LINEAR_START = 0.00085
LINEAR_END = 0.012


def alphas_cumprod(num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
    """SD's "scaled linear" betas (linear in sqrt(beta)), cumulative product of 1 - beta, float64."""
    betas = _torch_linspace(LINEAR_START**0.5, LINEAR_END**0.5, num_timesteps, np.float64) ** 2
    return np.cumprod(1.0 - betas)


def rounded(fn, *args) -> np.ndarray:
    """fn evaluated in float64 on float32 arguments and rounded to float32: the correctly rounded
    float32 result that torch's CPU kernels give for log/exp/expm1/pow, where numpy's own float32
    versions can be an ulp or two off."""
    return np.float32(fn(*(np.float64(np.float32(a)) for a in args)))


def _sigmas_of(acp: np.ndarray) -> np.ndarray:
    # The official code converts the float64 ratio to float32 first and takes the root in float32.
    return np.sqrt(((1.0 - acp) / acp).astype(np.float32))


def ddpm_sigmas(num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
    """The discrete sigma table of the denoiser, ascending (index = DDPM timestep), float32."""
    return _sigmas_of(alphas_cumprod(num_timesteps))


def legacy_timesteps(n: int, num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
    """The n DDPM timesteps the legacy discretization samples, ascending (999 is always the last)."""
    return np.linspace(num_timesteps - 1, 0, n, endpoint=False).astype(int)[::-1]


def legacy_sigmas(n: int, num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
    """The EDM sampler's n-step sigmas: descending, a 0 appended (n + 1 values), float32."""
    acp = alphas_cumprod(num_timesteps)
    if n < num_timesteps:
        acp = acp[legacy_timesteps(n, num_timesteps)]
    elif n > num_timesteps:
        raise ValueError(f"at most {num_timesteps} steps, got {n}")
    return np.append(_sigmas_of(acp)[::-1], np.float32(0.0))


def _torch_linspace(start: float, end: float, n: int, dtype: type) -> np.ndarray:
    """torch.linspace on the CPU: filled from both ends (numpy's differs in the last bit)."""
    if n == 1:
        return np.array([start], dtype)
    start, end = dtype(start), dtype(end)
    step = (end - start) / dtype(n - 1)
    i = np.arange(n)
    head = start + step * i.astype(dtype)
    tail = end - step * (n - 1 - i).astype(dtype)
    return np.where(i < n // 2, head, tail).astype(dtype)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) sigmas, every operation in float32 as k-diffusion does; a 0 appended."""
    ramp = _torch_linspace(0.0, 1.0, n, np.float32)
    min_inv = rounded(np.power, sigma_min, 1.0 / rho)
    max_inv = rounded(np.power, sigma_max, 1.0 / rho)
    sigmas = rounded(np.power, max_inv + ramp * (min_inv - max_inv), rho)
    return np.append(sigmas, np.float32(0.0))


def dpmpp_sigmas(n: int, num_timesteps: int = NUM_TIMESTEPS, rho: float = 7.0) -> np.ndarray:
    """The restoration DPM++ 2M sampler's sigmas: Karras between the ends of the n-step LEGACY schedule.

    sigma_min is the smallest non-zero legacy sigma of the same n (0.3977 for n = 8), so it depends on n.
    """
    legacy = legacy_sigmas(n, num_timesteps)
    return karras_sigmas(n, legacy[-2], legacy[0], rho)


def initial_noise_scale(num_timesteps: int = NUM_TIMESTEPS) -> float:
    """Factor applied to N(0, 1) noise to start sampling: sqrt(1 + sigma_max^2) of the LEGACY schedule.

    Both official samplers use it (DPM++ too, although its own first sigma is a float32 hair larger).
    """
    s = ddpm_sigmas(num_timesteps)[-1]
    return float(np.sqrt(np.float32(1.0) + s * s))


def linear_cfg(sigma, scale_start: float, scale_end: float) -> np.ndarray:
    """LinearCFG: the guidance scale is scale_start at RAMP_SIGMA and scale_end at sigma 0 (float32).

    The official code evaluates it on the float32 sigma tensor (sigma_hat in the EDM sampler).
    """
    sigma = np.asarray(sigma, dtype=np.float32)
    return np.float32(scale_start - scale_end) * sigma / np.float32(RAMP_SIGMA) + np.float32(scale_end)


def linear_control_scale(sigma: float, control_scale: float, control_start: float) -> float:
    """The EDM sampler's linear control scale at sigma_i (Python float arithmetic, as officially)."""
    return (float(sigma) / RAMP_SIGMA) * (control_start - control_scale) + control_scale


@dataclass(frozen=True)
class SamplerOptions:
    """The knobs of both restoration samplers, named like RestoreSettings (official names in comments).

    The DPM++ sampler reads only cfg, cfg_start, linear_cfg, control_scale, s_noise and eta: it ignores
    restoration guidance, churn and the control ramp, exactly as the official one does.
    """

    cfg: float = 4.0  # s_cfg: guidance scale at sigma 0 (LinearCFG scale_min)
    cfg_start: float = 1.0  # spt_linear_CFG: guidance scale at RAMP_SIGMA (LinearCFG scale)
    linear_cfg: bool = True  # linear_CFG; False: constant cfg
    control_scale: float = 1.0  # s_stage2: control scale at sigma 0
    control_start: float = 0.0  # spt_linear_s_stage2: control scale at RAMP_SIGMA (EDM only)
    linear_control: bool = False  # linear_s_stage2 (EDM only)
    restore_cfg: float = -1.0  # s_stage1: restoration guidance exponent, <= 0 is off (EDM only)
    s_churn: float = 0.0  # EDM only
    s_noise: float = 1.003
    eta: float = 1.0  # DPM++ only

    def cfg_scale(self, sigma) -> np.float32:
        """The guidance scale at this (float32) sigma."""
        return linear_cfg(sigma, self.cfg_start if self.linear_cfg else self.cfg, self.cfg)[()]

    def control_scale_at(self, sigma: float) -> float:
        """The EDM sampler's control scale at sigma_i."""
        if not self.linear_control:
            return self.control_scale
        return linear_control_scale(sigma, self.control_scale, self.control_start)
