"""The SDXL UNet with SUPIR's connectors (`LightGLVUNet`) and the control encoder (`GLVControl`), NHWC.

Both networks share the SDXL encoder (time/label embeddings, `input_blocks`, `middle_block`); attribute
names and list indices follow the official modules (sgm openaimodel.py / attention.py, SUPIR_v0.py), so
an official key such as `input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight` is our parameter
path. Parameter-free entries of the official Sequentials (SiLU, Dropout) are kept as placeholders so
the indices line up.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import ConfigError, ProjectConfig, UNetConfig
from .adapters import CrossAttention, ZeroCrossAttn, ZeroSFT
from .layers import Conv2d, LayerNorm, Upsample, geglu_linear, group_norm, timestep_embedding


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, eps: float):
        super().__init__()
        self.in_layers = [group_norm(channels, eps), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1)]
        self.emb_layers = [nn.SiLU(), nn.Linear(emb_channels, out_channels)]
        self.out_layers = [
            group_norm(out_channels, eps),
            nn.SiLU(),
            nn.Identity(),  # Dropout
            Conv2d(out_channels, out_channels, 3, padding=1),
        ]
        if channels != out_channels:
            self.skip_connection = nn.Linear(channels, out_channels)  # official 1x1 conv

    def __call__(self, x: mx.array, emb: mx.array) -> mx.array:
        # in_layers / out_layers: GroupNorm, SiLU, [Dropout,] conv; the norm applies the SiLU in its own pass
        h = self.in_layers[2](self.in_layers[0](x, silu=True))
        h = h + self.emb_layers[1](self.emb_layers[0](emb))[:, None, None, :]
        h = self.out_layers[3](self.out_layers[0](h, silu=True))
        return (self.skip_connection(x) if "skip_connection" in self else x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        return self.op(x)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def __call__(self, x: mx.array) -> mx.array:
        return geglu_linear(x, self.proj)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = [GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)]  # net.1 is a Dropout

    def __call__(self, x: mx.array) -> mx.array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.norm1 = LayerNorm(dim)
        self.norm2 = LayerNorm(dim)
        self.norm3 = LayerNorm(dim)

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, proj_in, `depth` transformer blocks over the H*W tokens, proj_out, residual.

    proj_in/proj_out are Linear; with `use_linear_in_transformer=False` the official 1x1 convs compute
    the same per-pixel product and their weights load squeezed.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, eps: float):
        super().__init__()
        inner = heads * dim_head
        self.norm = group_norm(channels, eps)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = [BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)]
        self.proj_out = nn.Linear(inner, channels)

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        b, h, w, c = x.shape
        t = self.proj_in(self.norm(x).reshape(b, h * w, c))
        for block in self.transformer_blocks:
            t = block(t, context)
        return x + self.proj_out(t).reshape(b, h, w, c)


def run_block(layers: list, h: mx.array, emb: mx.array, context: mx.array) -> mx.array:
    """One official TimestepEmbedSequential: ResBlocks read `emb`, transformers read `context`."""
    for layer in layers:
        if isinstance(layer, ResBlock):
            h = layer(h, emb)
        elif isinstance(layer, SpatialTransformer):
            h = layer(h, context)
        else:
            h = layer(h)
    return h


class SDXLEncoder(nn.Module):
    """What the UNet and the control encoder share: embeddings, input blocks, middle block."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        if cfg.model_channels % 32:
            raise ConfigError(f"model_channels must be a multiple of 32 (GroupNorm32), got {cfg.model_channels}")
        self.cfg = cfg
        mc, ted, eps = cfg.model_channels, cfg.time_embed_dim, cfg.groupnorm_eps
        self.time_embed = [nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted)]
        self.label_emb = [[nn.Linear(cfg.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted)]]
        self.input_blocks = [[Conv2d(cfg.in_channels, mc, 3, padding=1)]]
        # channels of every input-block output, consumed (reversed) by the decoder's skip connections
        self.skip_channels = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list = [ResBlock(ch, ted, mult * mc, eps)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(self.transformer(ch, cfg.transformer_depth[level]))
                self.input_blocks.append(layers)
                self.skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append([Downsample(ch)])
                self.skip_channels.append(ch)
                ds *= 2
        self.middle_block = [
            ResBlock(ch, ted, ch, eps),
            self.transformer(ch, cfg.transformer_depth_middle),
            ResBlock(ch, ted, ch, eps),
        ]

    def transformer(self, ch: int, depth: int) -> SpatialTransformer:
        heads = ch // self.cfg.num_head_channels
        return SpatialTransformer(
            ch, heads, self.cfg.num_head_channels, depth, self.cfg.context_dim, self.cfg.transformer_norm_eps
        )

    def embed(self, timesteps: mx.array, y: mx.array, dtype: mx.Dtype) -> mx.array:
        """time_embed(sinusoid(t)) + label_emb(y); the sinusoid is computed in fp32, then cast."""
        t_emb = timestep_embedding(timesteps, self.cfg.model_channels).astype(dtype)
        for layer in self.time_embed:
            t_emb = layer(t_emb)
        y = y.astype(dtype)
        for layer in self.label_emb[0]:
            y = layer(y)
        return t_emb + y

    def check_inputs(self, name: str, x: mx.array, timesteps: mx.array, context: mx.array, y: mx.array) -> None:
        cfg, mult = self.cfg, 2 ** (len(self.cfg.channel_mult) - 1)
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"{name} must be NHWC with {cfg.in_channels} channels, got shape {tuple(x.shape)}")
        b, h, w, _ = x.shape
        if h % mult or w % mult:
            raise ValueError(f"latent height and width must be multiples of {mult}, got {h}x{w}")
        if timesteps.shape != (b,):
            raise ValueError(f"timesteps must have shape ({b},), got {tuple(timesteps.shape)}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != cfg.context_dim:
            raise ValueError(f"context must be [{b}, tokens, {cfg.context_dim}], got {tuple(context.shape)}")
        if y.shape != (b, cfg.adm_in_channels):
            raise ValueError(f"vector y must be [{b}, {cfg.adm_in_channels}], got {tuple(y.shape)}")


class GLVControl(SDXLEncoder):
    """SUPIR's control encoder: an SDXL encoder whose first features get a 3x3 conv of the LQ latent added.

    `(x_hint, timesteps, xt, context, y)` -> the 10 feature maps (9 input-block outputs, middle output).
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg)
        self.input_hint_block = [Conv2d(cfg.in_channels, cfg.model_channels, 3, padding=1)]

    def __call__(
        self, x: mx.array, timesteps: mx.array, xt: mx.array, context: mx.array, y: mx.array
    ) -> list[mx.array]:
        self.check_inputs("xt", xt, timesteps, context, y)
        if x.shape != xt.shape:
            raise ValueError(f"control latent {tuple(x.shape)} and xt {tuple(xt.shape)} must have the same shape")
        dtype = x.dtype
        xt, context = xt.astype(dtype), context.astype(dtype)
        emb = self.embed(timesteps, y, dtype)
        h = run_block(self.input_blocks[0], xt, emb, context) + self.input_hint_block[0](x)
        hs = [h]
        for block in self.input_blocks[1:]:
            h = run_block(block, h, emb, context)
            hs.append(h)
        hs.append(run_block(self.middle_block, h, emb, context))
        return hs


class LightGLVUNet(SDXLEncoder):
    """The SDXL UNet whose decoder is steered by the control features through `project_modules`.

    After the middle block, ZeroSFT `project_modules[11]` applies control[9]; output block i merges its
    skip connection through a ZeroSFT with control[8-i] (instead of SDXL's plain concatenation), and the
    two blocks ending in an Upsample apply a ZeroCrossAttn with the same control feature before upsampling.
    """

    def __init__(self, unet: UNetConfig, project: ProjectConfig):
        super().__init__(unet)
        mc, ted, eps = unet.model_channels, unet.time_embed_dim, unet.groupnorm_eps
        n_features = len(self.input_blocks) + 1
        lists = (project.cond_output_channels, project.project_channels, project.concat_channels)
        if any(len(v) != n_features for v in lists):
            raise ConfigError(f"the project channel lists need {n_features} entries (one per control feature)")

        skips = list(self.skip_channels)
        ch = mc * unet.channel_mult[-1]
        self.output_blocks = []
        for level, mult in reversed(list(enumerate(unet.channel_mult))):
            ds = 2**level
            for i in range(unet.num_res_blocks + 1):
                layers: list = [ResBlock(ch + skips.pop(), ted, mult * mc, eps)]
                ch = mult * mc
                if ds in unet.attention_resolutions:
                    layers.append(self.transformer(ch, unet.transformer_depth[level]))
                if level and i == unet.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(layers)
        self.out = [group_norm(ch, eps), nn.SiLU(), Conv2d(ch, unet.out_channels, 3, padding=1)]

        # official order: one ZeroSFT per control feature, then ZeroCrossAttns inserted (at 6, then at 3)
        self.project_modules = [
            ZeroSFT(project.project_channels[i], project.cond_output_channels[i], project.concat_channels[i],
                    project.sft_hidden, eps)
            for i in range(n_features)
        ]
        for i in project.cross_attn_insert_idx:
            attn = ZeroCrossAttn(project.cond_output_channels[i], project.concat_channels[i],
                                 project.cross_attn_head_dim, eps)
            self.project_modules.insert(i, attn)

    def __call__(
        self,
        x: mx.array,
        timesteps: mx.array,
        context: mx.array,
        y: mx.array,
        control: list[mx.array],
        control_scale: float | mx.array = 1.0,
    ) -> mx.array:
        self.check_inputs("x", x, timesteps, context, y)
        if len(control) != len(self.input_blocks) + 1:
            raise ValueError(f"expected {len(self.input_blocks) + 1} control features, got {len(control)}")
        dtype = control[0].dtype
        x, context = x.astype(dtype), context.astype(dtype)
        emb = self.embed(timesteps, y, dtype)

        hs = []
        h = x
        for block in self.input_blocks:
            h = run_block(block, h, emb, context)
            hs.append(h)
        h = run_block(self.middle_block, h, emb, context)

        adapters = iter(reversed(self.project_modules))
        h = next(adapters)(control[-1], h, control_scale=control_scale)
        for i, block in enumerate(self.output_blocks):
            c = control[-2 - i]
            h = next(adapters)(c, hs.pop(), h, control_scale=control_scale)
            if isinstance(block[-1], Upsample):
                h = run_block(block[:-1], h, emb, context)
                h = block[-1](next(adapters)(c, h, control_scale=control_scale))
            else:
                h = run_block(block, h, emb, context)
        return self.out[2](self.out[0](h, silu=True))  # GroupNorm + SiLU, conv
