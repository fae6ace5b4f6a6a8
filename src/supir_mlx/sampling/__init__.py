"""Sampling: schedules, the discrete denoiser, noise sources, the restoration samplers, tiling.

    schedules   legacy DDPM / Karras sigmas, LinearCFG and control-scale ramps, SamplerOptions
    denoiser    sigma quantization, eps scalings, the CFG pair of denoiser outputs (DenoiseFn)
    noise       SeededNoise / ReplayNoise (also standing in for DPM++'s Brownian tree)
    edm         restoration-guided EDM (SUPIR's default sampler)
    dpmpp       restoration DPM++ 2M SDE (Lightning bases)
    tiled       sliding windows, Gaussian blending, tiled EDM / DPM++, automatic tile choice

A run: sigmas = legacy_sigmas(steps) (EDM) or dpmpp_sigmas(steps) (DPM++); x = noise.next(shape) *
initial_noise_scale(); x = sample_restore_edm(guided_denoiser(net, c, uc), x, sigmas, options, x_center, noise).
"""

from .denoiser import DENOISER, DenoiseFn, Denoiser, denoise, guided_denoiser
from .dpmpp import DPMStep, sample_restore_dpmpp
from .edm import EDMStep, sample_restore_edm
from .noise import NoiseSource, ReplayNoise, SeededNoise
from .schedules import SamplerOptions, dpmpp_sigmas, initial_noise_scale, legacy_sigmas
from .tiled import TiledStep, Tiling, auto_tiling, sample_tiled_restore_dpmpp, sample_tiled_restore_edm

__all__ = [
    "DENOISER",
    "DPMStep",
    "DenoiseFn",
    "Denoiser",
    "EDMStep",
    "NoiseSource",
    "ReplayNoise",
    "SamplerOptions",
    "SeededNoise",
    "TiledStep",
    "Tiling",
    "auto_tiling",
    "denoise",
    "dpmpp_sigmas",
    "guided_denoiser",
    "initial_noise_scale",
    "legacy_sigmas",
    "sample_restore_dpmpp",
    "sample_restore_edm",
    "sample_tiled_restore_dpmpp",
    "sample_tiled_restore_edm",
]
