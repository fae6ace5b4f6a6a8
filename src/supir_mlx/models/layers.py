"""Building blocks shared by every network: the one attention, the one GroupNorm, timestep embeddings."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# Largest score matrix (elements, all heads of one batch item) computed in one piece. Above it the
# queries are processed in chunks so a 512-channel single-head VAE attention over a 2048x2048 image
# (65536^2 scores) never materialises.
MAX_SCORE_ELEMENTS = 1 << 26


def attention(
    q: mx.array, k: mx.array, v: mx.array, heads: int, scale: float | None = None, causal: bool = False
) -> mx.array:
    """Multi-head attention over [B, N, heads*D] inputs; `causal`: query i sees keys 0..i only.

    Uses the fused `mx.fast.scaled_dot_product_attention`; queries are chunked when the full
    score matrix would exceed MAX_SCORE_ELEMENTS.
    """
    b, nq, c = q.shape
    nk = k.shape[1]
    d = c // heads
    dv = v.shape[-1] // heads
    scale = d**-0.5 if scale is None else scale
    q = q.reshape(b, nq, heads, d).transpose(0, 2, 1, 3)
    k = k.reshape(b, nk, heads, d).transpose(0, 2, 1, 3)
    v = v.reshape(b, nk, heads, dv).transpose(0, 2, 1, 3)
    chunk = max(1, MAX_SCORE_ELEMENTS // (heads * nk))

    def part(i: int, j: int) -> mx.array:
        # An explicit mask: MLX's mask="causal" aligns the last query with the last key, wrong for a chunk.
        mask = mx.arange(i, j)[:, None] >= mx.arange(nk)[None] if causal else None
        return mx.fast.scaled_dot_product_attention(q[:, :, i:j], k, v, scale=scale, mask=mask)

    if nq <= chunk:
        out = part(0, nq)
    else:
        out = mx.concatenate([part(i, min(i + chunk, nq)) for i in range(0, nq, chunk)], axis=2)
    return out.transpose(0, 2, 1, 3).reshape(b, nq, heads * dv)


def group_norm(channels: int, eps: float, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm over the last (channel) axis with PyTorch's grouping of channels."""
    return nn.GroupNorm(groups, channels, eps=eps, affine=True, pytorch_compatible=True)


def timestep_embedding(t: mx.array, dim: int, max_period: float = 10000.0) -> mx.array:
    """Sinusoidal embedding `[cos(t f), sin(t f)]` (cos first), f_k = exp(-ln(max_period) k / half)."""
    half = dim // 2
    # The exponent in float32 as the official code forms it, exp correctly rounded: MLX's float32 exp is
    # off by up to 8 ulp, and at t ~ 1000 each ulp of a frequency moves cos(t f) by up to ~6e-5.
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = mx.array(np.exp(exponent.astype(np.float64)).astype(np.float32))
    args = t.astype(mx.float32)[:, None] * freqs[None]
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (UNet and VAE alike; nearest is exact in any dtype)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return self.conv(x)
