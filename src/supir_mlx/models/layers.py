"""Building blocks shared by every network: the one attention, the one GroupNorm, timestep embeddings."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import host

# Largest score matrix (elements, all heads of one batch item) computed in one piece. Above it the
# queries are processed in chunks so a 512-channel single-head VAE attention over a 2048x2048 image
# (65536^2 scores) never materialises.
MAX_SCORE_ELEMENTS = 1 << 26


def _cpu() -> bool:
    """Whether work runs on MLX's CPU backend, which gets its own paths for convolution and exp-based math."""
    return mx.default_device() == mx.cpu


def attention(
    q: mx.array, k: mx.array, v: mx.array, heads: int, scale: float | None = None, causal: bool = False
) -> mx.array:
    """Multi-head attention over [B, N, heads*D] inputs; `causal`: query i sees keys 0..i only.

    Uses the fused `mx.fast.scaled_dot_product_attention` (float32 on the CPU backend: `_sdpa_cpu`); queries
    are chunked when the full score matrix would exceed MAX_SCORE_ELEMENTS.
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

    sdpa = _sdpa_cpu if _host(q) else mx.fast.scaled_dot_product_attention

    def part(i: int, j: int) -> mx.array:
        # An explicit mask: MLX's mask="causal" aligns the last query with the last key, wrong for a chunk.
        mask = mx.arange(i, j)[:, None] >= mx.arange(nk)[None] if causal else None
        return sdpa(q[:, :, i:j], k, v, scale=scale, mask=mask)

    if nq <= chunk:
        out = part(0, nq)
    else:
        parts = []
        for i in range(0, nq, chunk):
            parts.append(part(i, min(i + chunk, nq)))
            if sdpa is _sdpa_cpu:
                # The host path has already made this chunk's scores; until its product with v runs they stay
                # alive, and without this every chunk's would (a 128-latent UNet tile held 3 at once: its peak
                # was 1.08 GB, now 0.61).
                mx.eval(parts[-1])
        out = mx.concatenate(parts, axis=2)
    return out.transpose(0, 2, 1, 3).reshape(b, nq, heads * dv)


def _host(x: mx.array) -> bool:
    """Whether element-wise work on `x` goes to models.host (float32 on MLX's CPU backend): there MLX runs it on
    one thread with a scalar exp, 6-9x slower than NumPy's vectorised exp spread over the cores."""
    return _cpu() and x.dtype == mx.float32


@mx.compile
def _scale_shift(x: mx.array, a: mx.array, b: mx.array) -> mx.array:
    return (x.astype(mx.float32) * a + b).astype(x.dtype)


@mx.compile
def _scale_shift_silu(x: mx.array, a: mx.array, b: mx.array) -> mx.array:
    y = x.astype(mx.float32) * a + b
    return (y * mx.sigmoid(y)).astype(x.dtype)


@mx.compile
def _gated_gelu(a: mx.array, gate: mx.array) -> mx.array:
    return a * nn.gelu(gate)


def scale_shift(x: mx.array, a: mx.array, b: mx.array, silu: bool = False) -> mx.array:
    """x * a + b, then SiLU when asked, in one pass (two on the CPU backend: MLX's scale-shift into a new array,
    then the host's SiLU over it in place; the host writing the new array itself measured 5-70% slower, as the
    array must first be allocated and zero-filled by MLX on one thread)."""
    if silu:
        return host.silu_(_scale_shift(x, a, b)) if _host(x) else _scale_shift_silu(x, a, b)
    return _scale_shift(x, a, b)


def gelu(x: mx.array) -> mx.array:
    """GELU (exact, erf) of a result the caller owns (on the CPU backend it is overwritten)."""
    return host.gelu_(x) if _host(x) else nn.gelu(x)


def quick_gelu(x: mx.array) -> mx.array:
    """CLIP's x * sigmoid(1.702 x) of a result the caller owns (on the CPU backend it is overwritten)."""
    return host.silu_(x, 1.702) if _host(x) else x * mx.sigmoid(1.702 * x)


def geglu(h: mx.array) -> mx.array:
    """a * GELU(gate) (exact, erf) for GEGLU's projection `h` = [a, gate]: one full-size result instead of one per
    element-wise op (on the CPU backend, written over `h`'s first half, which the caller must own)."""
    if _host(h):
        return host.geglu_(h)
    a, gate = mx.split(h, 2, axis=-1)
    return _gated_gelu(a, gate)


def geglu_linear(x: mx.array, proj: nn.Module) -> mx.array:
    """GEGLU of the projection `proj(x)`. On the CPU backend an unquantized projection's bias is added inside the
    GEGLU pass instead: MLX's CPU addmm first broadcasts the bias into the whole output on one thread (2 x 1024
    tokens, 640 -> 10240, fp32: 166 ms against 79 ms for the product alone)."""
    if _host(x) and type(proj) is nn.Linear and "bias" in proj:
        return host.geglu_(x @ proj.weight.T, proj.bias)
    return geglu(proj(x))


@mx.compile
def _centered_square(x: mx.array, mean: mx.array) -> mx.array:
    return mx.square(x.astype(mx.float32) - mean)


# Pixels per piece of the GroupNorm statistics: their float32 temporaries stay this small (x channels) instead of
# one or two full-size float32 copies of the activations (1 GB each for a 1024 px, 128-channel VAE state).
STAT_PIXELS = 1 << 15


def _pixel_mean(x: mx.array, fn=None) -> mx.array:
    """Mean of fn(x) (element-wise; default: x) in float32 over all pixels of [B, H, ..., C]: [B, C].

    A band of rows at a time, each flattened to [B, pixels, C] (free for a contiguous x, a band-sized copy for a
    strided view such as a CPU convolution's output) and summed per channel.
    """
    b, rows, c = x.shape[0], x.shape[1], x.shape[-1]
    row_pixels = math.prod(x.shape[2:-1])
    step = max(1, STAT_PIXELS // row_pixels)
    total = None
    for i in range(0, rows, step):
        piece = x[:, i : i + step].reshape(b, -1, c)
        part = mx.sum(fn(piece) if fn else piece.astype(mx.float32), axis=1)
        total = part if total is None else total + part
    return total / (rows * row_pixels)


def group_statistics(x: mx.array, groups: int) -> tuple[mx.array, mx.array]:
    """Per (sample, group) mean and biased variance [B, groups] of [B, H, ..., C], float32, two-pass like PyTorch.

    Reduced over the pixels first (column sums per channel, a piece of pixels at a time), then over the
    channels of each group: MLX reduces a [B, pixels, C] array along the pixels ~15x faster than over two
    strided axes at once, and the pieces keep the float32 temporaries small.
    """
    if _host(x):
        return host.group_statistics(x, groups)
    b, c = x.shape[0], x.shape[-1]
    per = c // groups
    mean = mx.mean(_pixel_mean(x).reshape(b, groups, per), axis=-1)
    mean_c = mx.repeat(mean, per, axis=1)[:, None, :]
    var = _pixel_mean(x, lambda piece: _centered_square(piece, mean_c))
    return mean, mx.mean(var.reshape(b, groups, per), axis=-1)


class GroupNorm(nn.Module):
    """PyTorch's GroupNorm over the channel (last) axis, optionally followed by SiLU.

    The statistics are taken in float32 whatever the activations' dtype (MLX sums float16 in float16, which
    overflows over a large group), then folded with the affine parameters into one per-(sample, channel)
    scale and shift, so normalising is a single fused pass over the activations (and SiLU rides in it)
    instead of the ~5 full-size temporaries of subtract, divide, multiply, add and activation.
    """

    def __init__(self, groups: int, channels: int, eps: float):
        super().__init__()
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups")
        self.groups, self.eps = groups, eps
        self.weight = mx.ones((channels,))
        self.bias = mx.zeros((channels,))

    def statistics(self, x: mx.array) -> tuple[mx.array, mx.array]:
        return group_statistics(x, self.groups)

    def normalize(self, x: mx.array, mean: mx.array, var: mx.array, silu: bool = False) -> mx.array:
        """Apply the norm with given group statistics (the tiled VAE shares them across tiles)."""
        b, c = x.shape[0], x.shape[-1]
        per_group = c // self.groups
        inv = mx.repeat(mx.rsqrt(var + self.eps), per_group, axis=1)  # [B, C]
        a = inv * self.weight
        shift = self.bias - mx.repeat(mean, per_group, axis=1) * a
        shape = (b,) + (1,) * (x.ndim - 2) + (c,)
        # float32 scale and shift, applied in float32 inside the fused pass: in bf16, x * a and mean * a nearly
        # cancel when the mean is large against the spread, and their rounding would dominate the result
        a, shift = a.reshape(shape), shift.reshape(shape)
        return scale_shift(x, a, shift, silu)

    def __call__(self, x: mx.array, silu: bool = False) -> mx.array:
        return self.normalize(x, *self.statistics(x), silu=silu)


# Smallest input normalised by models.host: below it the host's fixed costs (evaluation, a zero-filled result,
# the pool) outweigh the second thread (2 x 77 x 1280: 0.63 ms in MLX, 0.91 ms on the host).
HOST_LAYER_NORM_ELEMENTS = 1 << 18


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm, normalised by models.host over the threads for large float32 inputs on the CPU backend,
    where MLX's layer_norm runs on one thread (2 x 1024 x 640: 4.2 against 2.7 ms; 2 x 4096 x 320: 30 against
    5.6 ms)."""

    def __call__(self, x: mx.array) -> mx.array:
        if _host(x) and x.size >= HOST_LAYER_NORM_ELEMENTS and "weight" in self and "bias" in self:
            return host.layer_norm(x, self.weight, self.bias, self.eps)
        return super().__call__(x)


def _sdpa_cpu(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None) -> mx.array:
    """softmax(q k^T scale) v for [B, heads, N, D] float32 on the CPU backend, where MLX's fused attention falls
    back to a softmax on its one-thread scalar exp: the score matrix (646 M elements per full-size denoiser call)
    is exponentiated in place by models.host, and the normalisation is applied to the output (D values per
    query) rather than to the scores (N values per query)."""
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf)
    e, sums = host.softmax_numerator_(scores)
    return (e @ v) / sums


def group_norm(channels: int, eps: float, groups: int = 32) -> GroupNorm:
    return GroupNorm(groups, channels, eps)


def timestep_embedding(t: mx.array, dim: int, max_period: float = 10000.0) -> mx.array:
    """Sinusoidal embedding `[cos(t f), sin(t f)]` (cos first), f_k = exp(-ln(max_period) k / half)."""
    half = dim // 2
    # The exponent in float32 as the official code forms it, exp correctly rounded: MLX's float32 exp is
    # off by up to 8 ulp, and at t ~ 1000 each ulp of a frequency moves cos(t f) by up to ~6e-5.
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = mx.array(np.exp(exponent.astype(np.float64)).astype(np.float32))
    args = t.astype(mx.float32)[:, None] * freqs[None]
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)


def pad_reflect(x: mx.array, p: int) -> mx.array:
    """PyTorch's ReflectionPad2d(p) on NHWC (the border row/column itself is not repeated)."""
    for axis in (1, 2):
        n = x.shape[axis]
        edge = lambda i: mx.take(x, mx.array([i]), axis=axis)  # noqa: E731
        x = mx.concatenate([edge(i) for i in range(p, 0, -1)] + [x] + [edge(n - 1 - i) for i in range(1, p + 1)], axis=axis)
    return x


def conv2d(
    x: mx.array, weight: mx.array, bias: mx.array | None, stride=(1, 1), padding=(1, 1), reflect: bool = False
) -> mx.array:
    """`mx.conv2d` plus bias, NHWC, weight [out, kh, kw, in]; `reflect` pads by reflection instead of zeros.

    On the CPU backend a 3x3, stride-1, padding-1 convolution (nearly every convolution here) runs as nine
    matrix products over shifted views instead, with no unfold buffer at all. With the input zero-padded and
    flattened to [B, (H+3)(W+2), C], the input pixels of tap (dy, dx) for every output pixel of the padded
    width are one contiguous slice starting at dy(W+2)+dx; the nine products accumulate in place (addmm) and
    the two junk columns per row are sliced off. MLX's CPU convolution first unfolds all nine taps (9x the
    input, written by one thread). On the 2-core CI machine, fp32: 256x256x128 -> 128 took 182 ms instead of
    402 ms and 65 MB instead of 353 MB above its input; 512x512x128 755 ms / 258 MB instead of 1853 ms / 1409 MB;
    64x64x320 batch 2 81 ms instead of 161 ms. GPU backends convolve without an unfold buffer and keep
    `mx.conv2d`.

    Convolutions with 1024 or more output channels (the UNet's 1280-channel levels, at a quarter of the latent's
    side) keep `mx.conv2d` on the CPU too: its one product with K = 9 cin beats nine products whose tap weights
    [cout, cin] are strided slices, by 1.6-3.5x at batch 2 (16x16x1280 -> 1280: 79 against 268 ms; 16x16x2560 ->
    1280: 212 against 657 ms; 32x32x2560 -> 1280: 757 against 1200 ms, MKL), and their unfold buffer is small
    (190 MB at the official 128-latent tile). Below 1024 output channels the nine products win (32x32x1920 -> 640:
    365 against 426 ms; 64x64x640 -> 320: 182 against 330 ms).
    """
    out_ch, kh, kw, cin = weight.shape
    # (inputs with few channels, like RGB, unfold cheaply, and nine products of depth 3 would be slow)
    if not (_cpu() and (kh, kw) == (3, 3) and tuple(stride) == (1, 1) and tuple(padding) == (1, 1) and cin >= 16
            and out_ch < 1024):
        if reflect:
            x, padding = pad_reflect(x, padding[0]), (0, 0)
        y = mx.conv2d(x, weight, stride=stride, padding=padding)
        return y if bias is None else y + bias
    b, h, w, c = x.shape
    wp = w + 2
    # one extra zero row at the bottom: the last taps of the last row's junk columns read past H+2 rows
    padded = mx.pad(pad_reflect(x, 1), [(0, 0), (0, 1), (0, 0), (0, 0)]) if reflect else mx.pad(x, [(0, 0), (1, 2), (1, 1), (0, 0)])
    flat = padded.reshape(b, (h + 3) * wp, c)
    out = None
    for dy in range(3):
        for dx in range(3):
            start = dy * wp + dx
            a, wt = flat[:, start : start + h * wp], weight[:, dy, dx].T
            if out is None:
                out = a @ wt if bias is None else mx.addmm(bias, a, wt)
            else:
                out = mx.addmm(out, a, wt)
    return out.reshape(b, h, wp, out_ch)[:, :, :w]


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same names) computed by `conv2d`."""

    def __call__(self, x: mx.array) -> mx.array:
        return conv2d(x, self.weight, self.get("bias"), self.stride, self.padding)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (UNet and VAE alike; nearest is exact in any dtype)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return self.conv(x)
