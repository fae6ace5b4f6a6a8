"""The whole SUPIR model, laid out like the official `SUPIRModel` so checkpoint keys map by name.

    model.diffusion_model    LightGLVUNet (SDXL UNet + project_modules)
    model.control_model      GLVControl
    first_stage_model        VAE (encoder, decoder, denoise_encoder, quant convs)
    conditioner.embedders    [CLIP ViT-L text (.transformer), OpenCLIP ViT-bigG text (.model)]

Everything is NHWC. The DDPM sigma table (`denoiser.sigmas` in the official state dict) is computed,
not loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..config import SUPIRConfig
from .conditioner import Conditioner
from .unet import GLVControl, LightGLVUNet
from .vae import AutoencoderKL


@dataclass
class Condition:
    """Conditioning of one branch (positive or negative) of classifier-free guidance."""

    crossattn: mx.array  # [B, 77, context_dim]
    vector: mx.array  # [B, adm_in_channels]
    control: mx.array  # [B, h, w, 4] LQ latent read by the control encoder


class ControlledUNet(nn.Module):
    """The official `model` attribute (ControlWrapper around the two networks)."""

    def __init__(self, config: SUPIRConfig):
        super().__init__()
        self.diffusion_model = LightGLVUNet(config.unet, config.project)
        self.control_model = GLVControl(config.unet)

    def __call__(
        self, x: mx.array, timesteps: mx.array, cond: Condition, control_scale: float | mx.array = 1.0
    ) -> mx.array:
        """eps prediction for an input already scaled by c_in; `timesteps` are DDPM indices."""
        control = self.control_model(cond.control, timesteps, x, cond.crossattn, cond.vector)
        return self.diffusion_model(x, timesteps, cond.crossattn, cond.vector, control, control_scale)


class SUPIRModel(nn.Module):
    def __init__(self, config: SUPIRConfig):
        super().__init__()
        self.config = config
        self.model = ControlledUNet(config)
        self.first_stage_model = AutoencoderKL(config.vae)
        self.conditioner = Conditioner(config)
