import mlx.core as mx
import numpy as np
import pytest

from supir_mlx.conformance import Context, Fixture, run
from supir_mlx.conformance.groups.control import control_model, nchw, nhwc
from supir_mlx.conformance.groups.unet import diffusion_model


@pytest.fixture(scope="module")
def ctx(reference_dir):
    return Context(reference_dir)


def unet_inputs(reference_dir, case="unet_8x8_cs0.6"):
    f = Fixture(reference_dir, reference_dir / "unet" / f"{case}.safetensors")
    args = (nhwc(f["x"]), mx.array(f["timesteps"]), mx.array(f["context"]), mx.array(f["y"]))
    return f, args, [nhwc(f[f"control_{i:02d}"]) for i in range(10)]


def test_control_and_unet_conformance(reference_dir):
    results = list(run(reference_dir, ["control", "unet"]))
    assert len(results) == 6
    for r in results:
        assert r.status == "PASS", r.line()
    assert sum(len(r.comparisons) for r in results) == 2 * 10 + 4


def test_control_scale_zero_ignores_control(reference_dir, ctx):
    """At control_scale 0 every connector is the identity (plain SDXL decoder): the control features drop out."""
    _, args, control = unet_inputs(reference_dir)
    unet = diffusion_model(ctx)
    other = [mx.random.normal(c.shape, key=mx.random.key(i)) for i, c in enumerate(control)]
    a = unet(*args, control, control_scale=0.0)
    b = unet(*args, other, control_scale=0.0)
    c = unet(*args, other, control_scale=1.0)
    assert np.array_equal(np.array(a), np.array(b))
    assert not np.allclose(np.array(a), np.array(c), atol=1e-3)


@pytest.mark.parametrize("dtype,rel", [(mx.float16, 1e-2), (mx.bfloat16, 6e-2)])
def test_half_precision_chain(reference_dir, dtype, rel):
    """Control encoder feeding the UNet in fp16/bf16 stays close to the fp32 official result."""
    fx, _, _ = unet_inputs(reference_dir)
    fc = Fixture(reference_dir, reference_dir / "control" / "control_8x8.safetensors")
    ctx = Context(reference_dir)
    control, unet = control_model(ctx), diffusion_model(ctx)
    control.set_dtype(dtype)
    unet.set_dtype(dtype)
    hs = control(
        nhwc(fc["x_control"]).astype(dtype),
        mx.array(fc["timesteps"]),
        nhwc(fc["xt"]),
        mx.array(fc["context"]),
        mx.array(fc["y"]),
    )
    out = unet(nhwc(fx["x"]), mx.array(fx["timesteps"]), mx.array(fx["context"]), mx.array(fx["y"]), hs, 0.6)
    assert out.dtype == dtype and all(h.dtype == dtype for h in hs)
    ref = fx["out"]
    assert np.abs(nchw(out) - ref).max() <= rel * np.abs(ref).max()


def test_bad_inputs_have_clear_errors(reference_dir, ctx):
    _, (x, t, context, y), control = unet_inputs(reference_dir)
    unet = diffusion_model(ctx)
    with pytest.raises(ValueError, match="expected 10 control features"):
        unet(x, t, context, y, control[:9])
    with pytest.raises(ValueError, match="multiples of 4"):
        unet(x[:, :6], t, context, y, control)
    with pytest.raises(ValueError, match="NHWC with 4 channels"):
        unet(x.transpose(0, 3, 1, 2), t, context, y, control)
    with pytest.raises(ValueError, match="vector y"):
        unet(x, t, context, y[:, :10], control)
    with pytest.raises(ValueError, match="same shape"):
        control_model(ctx)(x[:, :4], t, x, context, y)
