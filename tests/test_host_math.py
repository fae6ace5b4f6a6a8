"""The CPU backend's in-place NumPy element-wise math (models.host) against float64 references, on shapes that
split into many blocks over the thread pool, strided inputs, and extreme values."""

import math

import mlx.core as mx
import numpy as np
import pytest

from supir_mlx.models import host, layers

erf = np.vectorize(math.erf)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 4 K elements, so that these small arrays still split into many blocks per thread."""
    monkeypatch.setattr(host, "BLOCK_ELEMENTS", 1 << 12)


def test_silu_matches_float64_including_extremes():
    x = np.concatenate([np.linspace(-120, 120, 4001), np.random.default_rng(0).normal(0, 4, 200_000 - 4001)])
    y = x.astype(np.float32).reshape(-1, 100)  # 2000 rows: several blocks per thread
    got = np.array(host.silu_(mx.array(y)))
    ref = y.astype(np.float64) / (1 + np.exp(-y.astype(np.float64)))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=3e-7, atol=1e-30)


def test_geglu_matches_exact_gelu_and_leaves_gate_alone():
    rng = np.random.default_rng(1)
    h = rng.normal(0, 3, (3000, 2 * 96)).astype(np.float32)
    out = np.array(host.geglu_(mx.array(h)))
    a, g = h[:, :96].astype(np.float64), h[:, 96:].astype(np.float64)
    ref = a * 0.5 * g * (1 + erf(g / math.sqrt(2)))
    assert out.shape == (3000, 96)
    np.testing.assert_allclose(out, ref, rtol=0, atol=4e-6 * np.abs(a).max())  # A&S 7.1.26: |erf error| <= 1.5e-7


def test_geglu_linear_adds_the_bias_in_its_pass():
    # the CPU path multiplies without the bias and adds it inside the GEGLU pass; the reference is the projection
    # with its bias, then the exact GELU in float64
    import mlx.nn as nn

    mx.random.seed(3)
    proj = nn.Linear(64, 2 * 80)
    proj.bias = mx.random.normal((160,)) * 3
    x = mx.random.normal((2, 300, 64))
    h = np.array(proj(x), dtype=np.float64)
    a, g = h[..., :80], h[..., 80:]
    ref = a * 0.5 * g * (1 + erf(g / math.sqrt(2)))
    out = np.array(layers.geglu_linear(x, proj))
    assert out.shape == (2, 300, 80)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    quantized = nn.QuantizedLinear.from_linear(proj, 32, 8)  # no plain weight to multiply: the layer runs whole
    np.testing.assert_allclose(np.array(layers.geglu_linear(x, quantized)), ref, rtol=0, atol=0.05 * np.abs(ref).max())


def test_softmax_numerator_and_sums():
    rng = np.random.default_rng(2)
    s = (rng.normal(0, 6, (2, 3, 700, 333))).astype(np.float32)
    e, sums = host.softmax_numerator_(mx.array(s))
    shifted = (s - s.max(-1, keepdims=True)).astype(np.float64)  # the float32 subtraction, as any fp32 softmax
    ref = np.exp(shifted)
    np.testing.assert_allclose(np.array(e), ref, rtol=3e-7, atol=1e-30)
    np.testing.assert_allclose(np.array(sums), ref.sum(-1, keepdims=True), rtol=2e-6)
    assert sums.shape == (2, 3, 700, 1)


def test_strided_input_is_copied_not_corrupted():
    base = mx.array(np.arange(40 * 30, dtype=np.float32).reshape(40, 30) / 100 - 6)
    view = base.T  # not contiguous: host works on a contiguous copy, `base` stays as it was
    before = np.array(base)
    out = np.array(host.silu_(view))
    np.testing.assert_array_equal(np.array(base), before)
    ref = before.T.astype(np.float64) / (1 + np.exp(-before.T.astype(np.float64)))
    np.testing.assert_allclose(out, ref, rtol=3e-7)


def test_attention_on_cpu_uses_host_softmax_and_matches_float64():
    assert layers._host(mx.zeros((1,), mx.float32)) == (mx.default_device() == mx.cpu)
    rng = np.random.default_rng(3)
    q, k, v = (rng.normal(0, 1, (2, 300, 4 * 32)).astype(np.float32) for _ in range(3))
    mask_free = np.array(layers.attention(mx.array(q), mx.array(k), mx.array(v), 4))
    causal = np.array(layers.attention(mx.array(q), mx.array(k), mx.array(v), 4, causal=True))

    def ref(causal_mask: bool):
        qh, kh, vh = (t.astype(np.float64).reshape(2, 300, 4, 32).transpose(0, 2, 1, 3) for t in (q, k, v))
        s = qh @ kh.swapaxes(-1, -2) / math.sqrt(32)
        if causal_mask:
            s = np.where(np.tril(np.ones((300, 300), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        return ((p / p.sum(-1, keepdims=True)) @ vh).transpose(0, 2, 1, 3).reshape(2, 300, 128)

    np.testing.assert_allclose(mask_free, ref(False), atol=2e-6)
    np.testing.assert_allclose(causal, ref(True), atol=2e-6)


def test_chunked_attention_holds_one_chunk_of_scores_at_a_time(monkeypatch):
    # 16 chunks of 64 queries x 1024 keys (256 KB of scores each): all of them alive at once would be 4 MB.
    monkeypatch.setattr(layers, "MAX_SCORE_ELEMENTS", 64 * 1024)
    rng = np.random.default_rng(4)
    q, k, v = (mx.array(rng.normal(0, 1, (1, 1024, 8)).astype(np.float32)) for _ in range(3))
    whole = np.array(layers._sdpa_cpu(*(t.reshape(1, 1024, 1, 8).transpose(0, 2, 1, 3) for t in (q, k, v)),
                                      scale=8**-0.5).transpose(0, 2, 1, 3).reshape(1, 1024, 8))
    mx.eval(q, k, v)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    out = layers.attention(q, k, v, 1)
    mx.eval(out)
    chunk = 64 * 1024 * 4
    assert mx.get_peak_memory() - base < 4 * chunk
    np.testing.assert_allclose(np.array(out), whole, atol=1e-6)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_other_dtypes_do_not_go_to_host(dtype):
    x = mx.array(np.linspace(-5, 5, 64, dtype=np.float32)).astype(dtype).reshape(1, 2, 2, 16)
    y = layers.scale_shift(x, mx.ones((1, 1, 1, 16)), mx.zeros((1, 1, 1, 16)), silu=True)
    assert y.dtype == dtype
    ref = np.array(x.astype(mx.float32)) / (1 + np.exp(-np.array(x.astype(mx.float32))))
    np.testing.assert_allclose(np.array(y.astype(mx.float32)), ref, rtol=1e-2, atol=1e-2)


def test_group_statistics_of_a_strided_view_match_float64_and_leave_it_alone():
    rng = np.random.default_rng(4)
    full = mx.array((rng.normal(3, 2, (2, 70, 42, 64))).astype(np.float32))
    x = full[:, :, :40]  # strided, as a CPU convolution's output is
    before = np.array(full)
    mean, var = host.group_statistics(x, 8)
    ref = np.array(x).astype(np.float64).reshape(2, -1, 8, 8)
    np.testing.assert_allclose(np.array(mean), ref.mean(axis=(1, 3)), rtol=1e-6)
    np.testing.assert_allclose(np.array(var), ref.var(axis=(1, 3)), rtol=1e-6)
    np.testing.assert_array_equal(np.array(full), before)


def test_gelu_and_quick_gelu_match_float64():
    rng = np.random.default_rng(5)
    x = np.concatenate([np.linspace(-60, 60, 1301), [0.0, -0.0, 1e-30, -1e-30],
                        rng.normal(0, 4, 1500 * 130 - 1305)]).astype(np.float32).reshape(1500, 130)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(np.array(layers.gelu(mx.array(x))), 0.5 * x64 * (1 + erf(x64 / math.sqrt(2))),
                               rtol=0, atol=4e-6 * np.abs(x).max())
    np.testing.assert_allclose(np.array(layers.quick_gelu(mx.array(x))), x64 / (1 + np.exp(-1.702 * x64)),
                               rtol=3e-6, atol=1e-30)  # 1.702 x rounds in float32: ~|1.7 x| ulp through exp


@pytest.mark.parametrize("silu", [False, True])
def test_scale_shift_of_a_strided_view_matches_float64_and_leaves_it_alone(silu):
    rng = np.random.default_rng(6)
    full = mx.array(rng.normal(1, 3, (2, 50, 37, 48)).astype(np.float32))
    x = full[:, :, 3:33]  # strided, as a tile or a CPU convolution's output is
    before = np.array(full)
    a = rng.normal(0, 2, (2, 1, 1, 48)).astype(np.float32)
    b = rng.normal(0, 2, (2, 1, 1, 48)).astype(np.float32)
    out = layers.scale_shift(x, mx.array(a), mx.array(b), silu=silu)
    y = np.array(x).astype(np.float64) * a + b
    ref = y / (1 + np.exp(-y)) if silu else y
    assert out.shape == x.shape
    np.testing.assert_allclose(np.array(out), ref, rtol=1e-6, atol=2e-6)
    np.testing.assert_array_equal(np.array(full), before)


def test_layer_norm_matches_float64_and_leaves_its_input_alone(monkeypatch):
    monkeypatch.setattr(layers, "HOST_LAYER_NORM_ELEMENTS", 0)  # this small input goes to the host too
    rng = np.random.default_rng(7)
    # a large mean against the spread: a one-pass variance would lose it
    x = mx.array(rng.normal(40, 0.5, (3, 333, 96)).astype(np.float32))
    before = np.array(x)
    norm = layers.LayerNorm(96, eps=1e-5)
    norm.weight = mx.array(rng.normal(1, 0.5, 96).astype(np.float32))
    norm.bias = mx.array(rng.normal(0, 0.5, 96).astype(np.float32))
    out = np.array(norm(x))
    x64 = before.astype(np.float64)
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    ref = ref * np.array(norm.weight) + np.array(norm.bias)
    np.testing.assert_allclose(out, ref, rtol=0, atol=3e-5)
    np.testing.assert_array_equal(np.array(x), before)
