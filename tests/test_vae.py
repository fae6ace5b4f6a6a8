
import mlx.core as mx
import numpy as np
import pytest

from supir_mlx.config import VAEConfig
from supir_mlx.conformance import Context, Fixture, run
from supir_mlx.conformance.groups.vae import to_nchw, to_nhwc, vae
from supir_mlx.models.vae import AutoencoderKL
from supir_mlx.weights.loading import load_official


@pytest.fixture(scope="module")
def ctx(reference_dir):
    return Context(reference_dir)


def test_vae_conformance(reference_dir):
    results = list(run(reference_dir, ["vae/vae_"]))
    assert len(results) == 2
    for r in results:
        assert r.status == "PASS", r.line()


def test_bf16_close_to_fp32_and_stays_bf16(ctx, reference_dir):
    f32 = vae(ctx)
    bf16 = load_official(AutoencoderKL(ctx.config().vae), ctx.weights(), "first_stage_model.", dtype=mx.bfloat16)
    fixture = Fixture(reference_dir, reference_dir / "vae" / "vae_64x64.safetensors")
    x, z = to_nhwc(fixture["x"]), to_nhwc(fixture["z_denoise_scaled"])
    # a float32 array anywhere inside would promote the whole graph to float32
    assert bf16.encoder(x.astype(mx.bfloat16)).dtype == mx.bfloat16
    assert bf16.decoder(bf16.decoder_input(z)).dtype == mx.bfloat16
    assert f32.decoder(f32.decoder_input(z)).dtype == mx.float32
    for name, a, b in (
        ("z", bf16.encode_with_denoise(x), f32.encode_with_denoise(x)),
        ("decoded", bf16.decode(z), f32.decode(z)),
    ):
        assert a.dtype == mx.float32, name
        a, b = np.array(a), np.array(b)
        rel = np.abs(a - b).max() / np.abs(b).max()
        assert rel < 0.05, (name, rel)  # bf16 keeps 8 mantissa bits
        assert rel > 0, name  # it really ran in bf16


def test_sampled_encode_uses_the_given_noise(ctx, reference_dir):
    model = vae(ctx)
    fixture = Fixture(reference_dir, reference_dir / "vae" / "vae_48x80.safetensors")
    x = to_nhwc(fixture["x"])
    moments = model.encode_moments(x)
    mode = model.encode(x)
    assert np.allclose(np.array(mode), 0.13025 * np.array(moments[..., :4]), rtol=1e-6, atol=0)
    noise = to_nhwc(fixture["sample_noise"])
    sampled = to_nchw(model.encode(x, noise))
    ref = fixture["z_encode_sampled_scaled"]
    assert np.abs(sampled - ref).max() <= 1e-4 * np.abs(ref).max()


def test_bad_inputs_give_clear_errors(ctx):
    model = vae(ctx)
    with pytest.raises(ValueError, match="NHWC with 3 channels"):
        model.encode(mx.zeros((1, 3, 64, 64)))
    with pytest.raises(ValueError, match="NHWC with 4 channels"):
        model.decode(mx.zeros((1, 8, 8)))
    with pytest.raises(ValueError, match="noise shape"):
        model.encode(mx.zeros((1, 64, 64, 3)), mx.zeros((1, 4, 8, 8)))
    with pytest.raises(ValueError, match="not supported"):
        AutoencoderKL(VAEConfig(ch=32, attn_resolutions=(32,)))


def test_official_key_names(ctx):
    """Every first_stage_model key of the tiny checkpoint names one of our parameters, and back."""
    from mlx.utils import tree_flatten

    ours = {k for k, _ in tree_flatten(AutoencoderKL(ctx.config().vae).parameters())}
    theirs = {k[len("first_stage_model.") :] for k in ctx.weights() if k.startswith("first_stage_model.")}
    assert ours == theirs
