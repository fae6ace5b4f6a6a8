"""Quantized UNet + control encoder stay close to fp32 on the tiny random model; saved weights round-trip."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from supir_mlx.config import SUPIRConfig
from supir_mlx.models.unet import GLVControl, LightGLVUNet
from supir_mlx.weights.quantize import QuantizationError, QuantizedConv2d, QuantSpec, parameter_bytes, quantize

TINY = SUPIRConfig.from_reference(Path(__file__).parent / "reference" / "tiny" / "config.json")


class Denoiser(nn.Module):
    """The `model.*` part of SUPIRModel (same paths), without the VAE and text encoders."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = LightGLVUNet(TINY.unet, TINY.project)
        self.model.control_model = GLVControl(TINY.unet)

    def __call__(self, x, t, ctx, y, hint):
        control = self.model.control_model(hint, t, x, ctx, y)
        return self.model.diffusion_model(x, t, ctx, y, control)


def build() -> Denoiser:
    mx.random.seed(0)
    m = Denoiser()
    # realistic weight statistics: default inits leave many layers at zero-ish scale
    m.update(nn.utils.tree_map(lambda p: mx.random.normal(p.shape) / max(p.shape[-1], 1) ** 0.5 if p.ndim > 1 else p, m.parameters()))
    mx.eval(m.parameters())
    return m


def inputs():
    k = mx.random.key(1)
    ks = mx.random.split(k, 4)
    x = mx.random.normal((2, 8, 8, 4), key=ks[0])
    ctx = mx.random.normal((2, 77, TINY.unet.context_dim), key=ks[1])
    y = mx.random.normal((2, TINY.unet.adm_in_channels), key=ks[2])
    hint = mx.random.normal((2, 8, 8, 4), key=ks[3])
    return x, mx.array([500.0, 20.0]), ctx, y, hint


def rel_err(a, b) -> float:
    return (mx.linalg.norm(a - b) / mx.linalg.norm(b)).item()


@pytest.fixture(scope="module")
def reference():
    m = build()
    return m(*inputs())


@pytest.mark.parametrize("bits,bound", [(8, 0.02), (4, 0.25)])
def test_quantized_output_close_to_fp32(reference, bits, bound):
    m = build()
    full = parameter_bytes(m)
    quantize(m, QuantSpec(bits=bits, group_size=32))
    convs = [mod for _, mod in m.named_modules() if isinstance(mod, QuantizedConv2d)]
    linears = [mod for _, mod in m.named_modules() if isinstance(mod, nn.QuantizedLinear)]
    assert convs and linears
    assert not [p for p, mod in m.named_modules() if type(mod) is nn.Linear and mod.weight.shape[-1] % 32 == 0]
    assert parameter_bytes(m) < full * (bits + 4) / 32  # scales, biases, norms and the 4-channel input convs stay
    err = rel_err(m(*inputs()), reference)
    assert err < bound, f"{bits}-bit relative error {err:.4f}"
    assert err > 1e-6  # it really changed the weights


def test_4bit_is_coarser_than_8bit(reference):
    errs = {}
    for bits in (4, 8):
        m = quantize(build(), QuantSpec(bits=bits, group_size=32))
        errs[bits] = rel_err(m(*inputs()), reference)
    assert errs[4] > 3 * errs[8]


def test_quantized_weights_roundtrip_through_a_fresh_model(tmp_path):
    spec = QuantSpec(bits=4, group_size=32)
    m = quantize(build(), spec)
    out = m(*inputs())
    m.save_weights(str(tmp_path / "q.safetensors"))
    fresh = quantize(Denoiser(), QuantSpec.from_dict(spec.to_dict()))
    fresh.load_weights(str(tmp_path / "q.safetensors"), strict=True)
    assert mx.array_equal(fresh(*inputs()), out)
    assert len(tree_flatten(fresh.parameters())) == len(tree_flatten(m.parameters()))


def test_bad_settings_are_clear():
    with pytest.raises(QuantizationError, match="bits 7"):
        QuantSpec(bits=7)
    with pytest.raises(QuantizationError, match="group size 48"):
        QuantSpec(group_size=48)
    with pytest.raises(QuantizationError, match="nothing to quantize"):
        quantize(build(), QuantSpec(scope=("conditioner.",)))


@pytest.mark.parametrize("bits,bias", [(8, True), (4, False)])
def test_cpu_linear_equals_mlx_quantized_matmul(bits, bias):
    """The CPU backend's dequantize-then-BLAS path computes what MLX's quantized matmul computes."""
    from supir_mlx.weights.quantize import QuantizedLinear

    mx.random.seed(1)
    lin = nn.Linear(128, 96, bias=bias)
    q = QuantizedLinear.from_linear(lin, 64, bits)
    x = mx.random.normal((2, 7, 128))
    device = mx.default_device()
    mx.set_default_device(mx.cpu)  # the path under test, on any machine
    try:
        ours = q(x)
        reference = nn.QuantizedLinear.__call__(q, x)
        mx.eval(ours, reference)
    finally:
        mx.set_default_device(device)
    assert ours.shape == reference.shape == (2, 7, 96)
    assert mx.abs(ours - reference).max().item() < 1e-4 * mx.abs(reference).max().item()


def test_dequantized_weights_do_not_pile_up():
    """A chain of quantized layers holds about one dequantized weight at a time, not the whole chain's: the
    dequantizations wait for each layer's input instead of being scheduled ahead (30 of 40 were, before)."""
    from supir_mlx.weights.quantize import QuantizedLinear

    mx.random.seed(2)
    layers = [QuantizedLinear.from_linear(nn.Linear(1024, 1024), 64, 8) for _ in range(32)]
    convs = [QuantizedConv2d(nn.Conv2d(64, 64, 3, padding=1), 64, 8) for _ in range(32)]
    x, img = mx.random.normal((64, 1024)), mx.random.normal((1, 16, 16, 64))
    mx.eval([m.parameters() for m in layers + convs], x, img)
    weight = 1024 * 1024 * 4
    for chain, start, one in ((layers, x, weight), (convs, img, 64 * 64 * 9 * 4 + img.nbytes)):
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        h = start
        for m in chain:
            h = m(h)
        mx.eval(h)
        assert mx.get_peak_memory() - base < 8 * one
