"""Element-wise math done in place by NumPy on MLX's CPU backend (float32 only).

MLX's CPU backend runs element-wise kernels on one thread, and its exp one scalar at a time (~40 M elements/s;
~100 M/s even through a polynomial exp): SiLU after GroupNorm ran at 55-80 M elements/s, a third of a VAE pass.
NumPy's float32 exp is vectorised (~1 G elements/s per thread, within 2 ulp) and releases the GIL, so on 2
cores SiLU runs 6-9x faster, GEGLU's GELU 2.7x, the attention core (softmax and its two matmuls) 2.7x and the
GroupNorm statistics 1.4-3.3x. An evaluated MLX array is shared with NumPy through the buffer protocol
(`np.array(a, copy=False)`), and MLX documents that writes to that view reach the array: each function here
takes an array that the caller has just produced and owns, evaluates it, and rewrites it in place (the GroupNorm
statistics and LayerNorm only read theirs; LayerNorm writes a new array). Work goes in
blocks of rows that fit in cache, spread over a small thread pool. GPU backends never come here.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np

# Elements per block: 512 KB of float32, so a block and its temporaries stay inside a 2 MB L2 cache. Each NumPy
# call hands the GIL to the other thread and back, so small blocks pay that hand-over many times: against 32 K
# elements per block, 128 K ran GEGLU 1.2-1.7x, the attention softmax 1.0-3.5x and SiLU 1.1-3.9x faster here.
BLOCK_ELEMENTS = 1 << 17
WORKERS = min(os.cpu_count() or 1, 8)

_pools: dict[int, ThreadPoolExecutor] = {}


def _pool() -> ThreadPoolExecutor:
    """The process's pool (by pid: a forked child gets its own, the parent's threads do not exist there)."""
    pid = os.getpid()
    if pid not in _pools:
        _pools[pid] = ThreadPoolExecutor(WORKERS, thread_name_prefix="supir-host")
    return _pools[pid]


def _rows(a: mx.array) -> tuple[mx.array, np.ndarray]:
    """`a` made contiguous (a no-op for the fresh results callers pass, a copy for a strided view) and
    evaluated, with a writable [rows, last axis] NumPy view of its memory."""
    a = mx.contiguous(a)
    mx.eval(a)
    view = np.array(a, copy=False)
    if not (view.flags.writeable and view.flags.c_contiguous) or view.dtype != np.float32:
        raise TypeError("host math needs a contiguous, writable float32 array")
    return a, view.reshape(-1, view.shape[-1])


def _over_shares(rows: int, step: int, share) -> list:
    """share(lo, hi) over contiguous shares of `rows`, one per thread (`step`: rows per block, so no thread gets
    less than a block); the results in order."""
    shares = min(WORKERS, -(-rows // step))
    if shares <= 1:
        return [share(0, rows)]
    bounds = [rows * i // shares for i in range(shares + 1)]
    return [f.result() for f in [_pool().submit(share, lo, hi) for lo, hi in zip(bounds, bounds[1:])]]


def _run(rows: int, width: int, fn, scratch: int = 1) -> None:
    """fn(start, stop, *buffers) over blocks of rows of `width`, on the pool's threads (each thread a contiguous
    share of the rows, with its own `scratch` block-sized float32 buffers)."""
    step = max(1, BLOCK_ELEMENTS // max(1, width))

    def share(lo: int, hi: int) -> None:
        buffers = [np.empty((min(step, hi - lo), width), np.float32) for _ in range(scratch)]
        with np.errstate(over="ignore", under="ignore"):
            for start in range(lo, hi, step):
                stop = min(start + step, hi)
                fn(start, stop, *(t[: stop - start] for t in buffers))

    _over_shares(rows, step, share)


def softmax_numerator_(scores: mx.array) -> tuple[mx.array, mx.array]:
    """exp(scores - row max), written over `scores`, and the row sums ([..., 1]).

    Rows of -inf (fully masked) are not expected: attention masks here always leave a key visible."""
    scores, s = _rows(scores)
    sums = np.empty((s.shape[0], 1), np.float32)

    def block(lo: int, hi: int, _: np.ndarray) -> None:
        b = s[lo:hi]
        np.subtract(b, b.max(axis=1, keepdims=True), out=b)
        np.exp(b, out=b)
        np.sum(b, axis=1, keepdims=True, out=sums[lo:hi])

    _run(s.shape[0], s.shape[1], block)
    return scores, mx.array(sums).reshape(*scores.shape[:-1], 1)


def silu_(y: mx.array, beta: float = 1.0) -> mx.array:
    """y * sigmoid(beta y) = y / (1 + exp(-beta y)), written over `y` (beta 1: SiLU; 1.702: CLIP's quick GELU)."""
    y, s = _rows(y)

    def block(lo: int, hi: int, t: np.ndarray) -> None:
        b = s[lo:hi]
        np.multiply(b, -beta, out=t)
        np.exp(t, out=t)  # overflows to inf for beta y < -88: y / inf = -0, the limit
        t += 1.0
        np.divide(b, t, out=b)

    _run(s.shape[0], s.shape[1], block)
    return y


def layer_norm(x: mx.array, weight: mx.array, bias: mx.array, eps: float) -> mx.array:
    """LayerNorm over the last axis (mean and biased variance in two passes, like PyTorch) into a new array."""
    x, v = _rows(x)
    # The input (the residual stream) must survive, so the result goes to a new array, which MLX zero-fills on one
    # thread first: ~13 GB/s for a buffer its cache recycles, ~2 GB/s for one the kernel must map (page faults).
    # That is why only LayerNorm, where MLX's own pass is far slower, writes a new array from here.
    out = mx.zeros(x.shape, mx.float32)
    mx.eval(out)
    o = np.array(out, copy=False).reshape(v.shape)
    width = v.shape[1]
    weight, bias = np.asarray(weight, dtype=np.float32), np.asarray(bias, dtype=np.float32)

    def block(lo: int, hi: int) -> None:
        rows, normed = v[lo:hi], o[lo:hi]
        mean = np.add.reduce(rows, axis=1, keepdims=True)
        mean /= width
        np.subtract(rows, mean, out=normed)
        var = np.vecdot(normed, normed)[:, None]  # row sums of squares
        var /= width
        var += eps
        normed /= np.sqrt(var, out=var)
        normed *= weight
        normed += bias

    _run(v.shape[0], width, block, scratch=0)
    return out


# erf by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7, below float32 noise at the reference tolerances)
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
_ERF_P_OVER_SQRT2 = np.float32(_ERF_P / np.sqrt(2.0))  # erf's argument is g / sqrt 2
_HALF_ERF_A = tuple(np.float32(c / 2) for c in _ERF_A)


def _gelu(g: np.ndarray, t: np.ndarray, u: np.ndarray) -> np.ndarray:
    """GELU(g) (exact, erf) into `u`, with `t` as scratch; returns `u`.

    With w = erfc(|g| / sqrt 2) / 2 (the normal tail beyond |g|), g * Phi(g) is g (1 - w) for g >= 0 and g w
    below: both are max(g, 0) - |g| w, which needs no sign fix-up (np.copysign alone was a quarter of the time).
    """
    np.abs(g, out=t)
    t *= _ERF_P_OVER_SQRT2
    t += 1.0
    np.reciprocal(t, out=t)  # t = 1 / (1 + p |g| / sqrt 2)
    np.multiply(t, _HALF_ERF_A[4], out=u)
    for c in _HALF_ERF_A[3::-1]:
        u += c
        u *= t  # u = t (a1 + t (a2 + ...)) / 2
    np.square(g, out=t)
    t *= -0.5
    np.exp(t, out=t)
    u *= t  # w
    np.abs(g, out=t)
    u *= t
    np.maximum(g, 0.0, out=t)
    return np.subtract(t, u, out=u)


def gelu_(x: mx.array) -> mx.array:
    """GELU(x) (exact, erf), written over `x`."""
    x, s = _rows(x)

    def block(lo: int, hi: int, t: np.ndarray, u: np.ndarray) -> None:
        np.copyto(s[lo:hi], _gelu(s[lo:hi], t, u))

    _run(s.shape[0], s.shape[1], block, scratch=2)
    return x


def geglu_(h: mx.array, bias: mx.array | None = None) -> mx.array:
    """GEGLU on the projection `h` = [a, gate] (last axis), plus `bias` (of the projection, added to both halves
    first, when given): a * GELU(gate) written over the `a` half; returns that half (a strided view of `h`)."""
    h, s = _rows(h)
    inner = s.shape[1] // 2
    if bias is not None:
        bias = np.asarray(bias.astype(mx.float32))
        bias_a, bias_gate = bias[:inner], bias[inner:]

    def block(lo: int, hi: int, t: np.ndarray, u: np.ndarray) -> None:
        if bias is not None:
            s[lo:hi, :inner] += bias_a
            s[lo:hi, inner:] += bias_gate
        s[lo:hi, :inner] *= _gelu(s[lo:hi, inner:], t, u)

    _run(s.shape[0], inner, block, scratch=2)
    return h[..., :inner]


def group_statistics(x: mx.array, groups: int) -> tuple[mx.array, mx.array]:
    """Per (sample, group) mean and biased variance [B, groups] of [B, H, ..., C], two-pass like PyTorch; read
    through a view of `x` (which may be strided, e.g. a CPU convolution's output), never copied or written.
    Bands of rows go to the threads; each sums in float32 within a band and in float64 across bands."""
    mx.eval(x)
    v = np.array(x, copy=False)
    if v.dtype != np.float32:
        raise TypeError("host math needs float32")
    b, rows, c = v.shape[0], v.shape[1], v.shape[-1]
    pixels = v[0, 0].size // c
    axes = tuple(range(1, v.ndim - 1))
    step = max(1, BLOCK_ELEMENTS // max(1, b * pixels * c))

    def summed(fn) -> np.ndarray:
        def share(lo: int, hi: int) -> np.ndarray:
            total = np.zeros((b, c), np.float64)
            scratch = np.empty((b, min(step, hi - lo)) + v.shape[2:], np.float32)
            for start in range(lo, hi, step):
                stop = min(start + step, hi)
                total += fn(v[:, start:stop], scratch[:, : stop - start]).sum(axis=axes)
            return total

        return sum(_over_shares(rows, step, share))

    n = rows * pixels
    per = c // groups
    channel_mean = summed(lambda band, _: band) / n
    mean = channel_mean.reshape(b, groups, per).mean(-1)
    centre = np.repeat(mean, per, axis=1).astype(np.float32).reshape((b,) + (1,) * (v.ndim - 2) + (c,))

    def centred_square(band: np.ndarray, t: np.ndarray) -> np.ndarray:
        np.subtract(band, centre, out=t)
        return np.square(t, out=t)

    var = (summed(centred_square) / n).reshape(b, groups, per).mean(-1)
    return mx.array(mean.astype(np.float32)), mx.array(var.astype(np.float32))
