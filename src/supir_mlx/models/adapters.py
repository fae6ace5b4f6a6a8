"""The SUPIR connectors that feed control features into the SDXL decoder (NHWC).

`CrossAttention` (the sgm module: `to_q/to_k/to_v` without bias, `to_out.0`) lives here because both
the SDXL transformer blocks (models/unet.py) and `ZeroCrossAttn` use it.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .layers import Conv2d, attention, group_norm


def blend(x: mx.array, x_raw: mx.array, control_scale: float | mx.array) -> mx.array:
    """`x * s + x_raw * (1 - s)` as the official code writes it; s == 1 is exactly `x`, so skip the work."""
    if isinstance(control_scale, (int, float)):
        if control_scale == 1:
            return x
        return x * control_scale + x_raw * (1 - control_scale)
    s = control_scale.astype(x.dtype)
    return x * s + x_raw * (1 - s)


def scaled(x: mx.array, control_scale: float | mx.array) -> mx.array:
    if isinstance(control_scale, (int, float)):
        return x if control_scale == 1 else x * control_scale
    return x * control_scale.astype(x.dtype)


class CrossAttention(nn.Module):
    """Multi-head attention with queries from `x` ([B, N, query_dim]) and keys/values from `context`."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = [nn.Linear(inner, query_dim)]  # to_out.1 is a Dropout in the official Sequential

    def __call__(self, x: mx.array, context: mx.array | None = None) -> mx.array:
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out[0](out)


class ZeroSFT(nn.Module):
    """Spatial feature transform of the decoder features by a control feature map `c`.

    Called as `(c, h=skip, h_ori=current)`: the skip connection gets `zero_conv(c)` added, is concatenated
    after the current features ([current, skip], SDXL's order), normalised and modulated by
    `1 + zero_mul(a)`, `zero_add(a)` with `a = SiLU(mlp_shared(c))`; `control_scale` blends with the
    un-modulated concatenation. Without `h_ori` (after the middle block) nothing is concatenated.
    """

    def __init__(self, label_nc: int, norm_nc: int, concat_channels: int, hidden: int, eps: float):
        super().__init__()
        out = norm_nc + concat_channels
        self.param_free_norm = group_norm(out, eps)
        self.mlp_shared = [Conv2d(label_nc, hidden, 3, padding=1), nn.SiLU()]
        self.zero_mul = Conv2d(hidden, out, 3, padding=1)
        self.zero_add = Conv2d(hidden, out, 3, padding=1)
        self.zero_conv = nn.Linear(label_nc, norm_nc)  # official 1x1 conv

    def __call__(
        self, c: mx.array, h: mx.array, h_ori: mx.array | None = None, control_scale: float | mx.array = 1.0
    ) -> mx.array:
        x = h + self.zero_conv(c)
        h_raw = h
        if h_ori is not None:
            x = mx.concatenate([h_ori, x], axis=-1)
            h_raw = mx.concatenate([h_ori, h], axis=-1)
        a = self.mlp_shared[1](self.mlp_shared[0](c))
        x = self.param_free_norm(x) * (self.zero_mul(a) + 1) + self.zero_add(a)
        return blend(x, h_raw, control_scale)


class ZeroCrossAttn(nn.Module):
    """`x + s * Attn(q=GN(x), kv=GN(context))` over flattened pixels: UNet features attend to control features."""

    def __init__(self, context_dim: int, query_dim: int, head_dim: int, eps: float):
        super().__init__()
        self.attn = CrossAttention(query_dim, context_dim, query_dim // head_dim, head_dim)
        self.norm1 = group_norm(query_dim, eps)
        self.norm2 = group_norm(context_dim, eps)

    def __call__(self, context: mx.array, x: mx.array, control_scale: float | mx.array = 1.0) -> mx.array:
        b, h, w, c = x.shape
        q = self.norm1(x).reshape(b, h * w, c)
        kv = self.norm2(context)
        kv = kv.reshape(b, -1, kv.shape[-1])
        return x + scaled(self.attn(q, kv).reshape(b, h, w, c), control_scale)
