"""SDXL's AutoencoderKL plus SUPIR's `denoise_encoder`, NHWC, images in [-1, 1].

Named like the official `first_stage_model` (`encoder.down.0.block.1.conv2`, `decoder.up.3.upsample.conv`,
`encoder.mid.attn_1.q`, ...) so checkpoint keys map by name; 1x1 convolutions are `nn.Linear`.
The compute dtype is the dtype the weights were loaded in (fp32 or bf16; fp16 overflows in this VAE):
inputs are cast to it, and every public method returns float32 like the official `.float()` outputs.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import VAEConfig
from .layers import Conv2d, Upsample, attention, group_norm

LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution clamps logvar before exp


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, eps: float):
        super().__init__()
        self.norm1 = group_norm(cin, eps)
        self.conv1 = Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(cout, eps)
        self.conv2 = Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Linear(cin, cout)

    def shortcut(self, x: mx.array) -> mx.array:
        return self.nin_shortcut(x) if "nin_shortcut" in self else x

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv1(self.norm1(x, silu=True))
        h = self.conv2(self.norm2(h, silu=True))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels (the VAE mid block)."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.norm = group_norm(channels, eps)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.proj_out = nn.Linear(channels, channels)

    def attend(self, h: mx.array) -> mx.array:
        """Everything after the norm; the tiled VAE calls it with its own shared-statistics norm."""
        b, hh, ww, c = h.shape
        h = h.reshape(b, hh * ww, c)
        out = attention(self.q(h), self.k(h), self.v(h), heads=1, scale=c**-0.5)
        return self.proj_out(out).reshape(b, hh, ww, c)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.attend(self.norm(x))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2)

    def __call__(self, x: mx.array) -> mx.array:
        # the official pads right and bottom only, then a stride-2 valid convolution
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Level(nn.Module):
    """One resolution of the encoder (`down.i`) or decoder (`up.i`)."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = blocks
        if resample is not None:
            setattr(self, name, resample)


class Mid(nn.Module):
    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, eps)
        self.attn_1 = AttnBlock(channels, eps)
        self.block_2 = ResnetBlock(channels, channels, eps)

    def __call__(self, x: mx.array) -> mx.array:
        return self.block_2(self.attn_1(self.block_1(x)))


# Activations at least this large (elements) are evaluated block by block. Handed the whole pass as one
# graph, MLX schedules work from several blocks ahead and keeps their full-resolution temporaries alive at
# once: a 1024 px bf16 decode peaked 6.75 GB above its input on the GPU backend as one graph and 2.77 GB
# evaluated per block (H200, MLX 0.32.4 CUDA; 1.66 -> 1.01 GB at 512 px), for ~1 ms of synchronisation per
# block. Small activations (the tiny test model, latent-sized tiles) keep the single graph.
SETTLE_ELEMENTS = 1 << 22


def settle(h: mx.array) -> mx.array:
    if h.size >= SETTLE_ELEMENTS:
        mx.eval(h)
    return h


def _check(cfg: VAEConfig) -> None:
    if cfg.attn_resolutions:
        raise ValueError(
            f"VAE attention at resolutions {list(cfg.attn_resolutions)} is not supported "
            "(the SDXL VAE has attention only in its mid block)"
        )


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        _check(cfg)
        eps, ch = cfg.groupnorm_eps, cfg.ch
        self.conv_in = Conv2d(cfg.in_channels, ch, 3, padding=1)
        mults = (1,) + tuple(cfg.ch_mult)
        self.down = []
        for i, mult in enumerate(cfg.ch_mult):
            cin, cout = ch * mults[i], ch * mult
            blocks = [ResnetBlock(cin if j == 0 else cout, cout, eps) for j in range(cfg.num_res_blocks)]
            last = i == len(cfg.ch_mult) - 1
            self.down.append(Level(blocks, None if last else Downsample(cout), "downsample"))
        top = ch * cfg.ch_mult[-1]
        self.mid = Mid(top, eps)
        self.norm_out = group_norm(top, eps)
        self.conv_out = Conv2d(top, 2 * cfg.z_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = settle(block(h))
            if "downsample" in level:
                h = settle(level.downsample(h))
        h = self.mid(h)
        return self.conv_out(self.norm_out(h, silu=True))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        _check(cfg)
        eps, ch = cfg.groupnorm_eps, cfg.ch
        top = ch * cfg.ch_mult[-1]
        self.conv_in = Conv2d(cfg.z_channels, top, 3, padding=1)
        self.mid = Mid(top, eps)
        # `up[i]` is resolution i (0 = full size); it is built and run from the lowest resolution up.
        up: list[Level] = [None] * len(cfg.ch_mult)  # type: ignore[list-item]
        cin = top
        for i in reversed(range(len(cfg.ch_mult))):
            cout = ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(cin if j == 0 else cout, cout, eps) for j in range(cfg.num_res_blocks + 1)]
            up[i] = Level(blocks, Upsample(cout) if i > 0 else None, "upsample")
            cin = cout
        self.up = up
        self.norm_out = group_norm(cin, eps)
        self.conv_out = Conv2d(cin, cfg.out_ch, 3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        h = settle(self.mid(self.conv_in(z)))
        for level in reversed(self.up):
            for block in level.block:
                h = settle(block(h))
            if "upsample" in level:
                h = settle(level.upsample(h))
        return self.conv_out(self.norm_out(h, silu=True))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.denoise_encoder = Encoder(cfg)
        self.quant_conv = nn.Linear(2 * cfg.z_channels, 2 * cfg.embed_dim)
        self.post_quant_conv = nn.Linear(cfg.embed_dim, cfg.z_channels)

    @property
    def dtype(self) -> mx.Dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def scale_factor(self) -> float:
        return self.cfg.scale_factor

    def _input(self, x: mx.array, channels: int, what: str) -> mx.array:
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"{what} must be NHWC with {channels} channels, got shape {tuple(x.shape)}")
        return x.astype(self.dtype)

    def moments_from_features(self, h: mx.array) -> mx.array:
        """quant_conv on encoder features (mean = first half of the channels, logvar = second half)."""
        return self.quant_conv(h).astype(mx.float32)

    def encode_moments(self, x: mx.array) -> mx.array:
        """[B, H, W, 3] image -> [B, H/8, W/8, 2*embed] moments (mean, logvar) of the plain encoder."""
        return self.moments_from_features(self.encoder(self._input(x, self.cfg.in_channels, "image")))

    def denoise_moments(self, x: mx.array) -> mx.array:
        """The same through SUPIR's degradation-robust `denoise_encoder`."""
        return self.moments_from_features(self.denoise_encoder(self._input(x, self.cfg.in_channels, "image")))

    def latent_from_moments(self, moments: mx.array, noise: mx.array | None = None) -> mx.array:
        """scale * posterior mode, or scale * posterior sample with the given standard-normal `noise`."""
        mean, logvar = mx.split(moments, 2, axis=-1)
        if noise is None:
            return self.scale_factor * mean
        if tuple(noise.shape) != tuple(mean.shape):
            raise ValueError(f"noise shape {tuple(noise.shape)} != latent shape {tuple(mean.shape)}")
        std = mx.exp(0.5 * mx.clip(logvar, *LOGVAR_RANGE))
        return self.scale_factor * (mean + std * noise.astype(mean.dtype))

    def encode(self, x: mx.array, noise: mx.array | None = None) -> mx.array:
        """Official `encode_first_stage` (which samples: pass its draw as `noise`); None gives the mode."""
        return self.latent_from_moments(self.encode_moments(x), noise)

    def encode_with_denoise(self, x: mx.array) -> mx.array:
        """Official `encode_first_stage_with_denoise(x, use_sample=False)`."""
        return self.latent_from_moments(self.denoise_moments(x))

    def decoder_input(self, z: mx.array) -> mx.array:
        """post_quant_conv of an unscaled latent: what the (tiled or not) decoder consumes."""
        z = self._input(z, self.cfg.embed_dim, "latent")
        return self.post_quant_conv(z / self.scale_factor)

    def decode(self, z: mx.array) -> mx.array:
        """Official `decode_first_stage`: scaled latent [B, h, w, 4] -> image [B, 8h, 8w, 3]."""
        return self.decoder(self.decoder_input(z)).astype(mx.float32)
