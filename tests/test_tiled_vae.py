import mlx.core as mx
import numpy as np
import pytest

from supir_mlx.config import VAEConfig
from supir_mlx.conformance import Fixture, run
from supir_mlx.conformance.groups.vae import to_nchw, to_nhwc
from supir_mlx.models.vae import AutoencoderKL
from supir_mlx.pipeline.tiled_vae import (
    estimate_bytes,
    plan_tiles,
    split_tiles,
    tiled_decode,
    tiled_encode_with_denoise,
    tiled_encoder_features,
    tiled_forward,
)

# Cheap random-weight VAE for properties (GroupNorm(32) needs multiples of 32 channels).
SMALL = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)


@pytest.fixture(scope="module")
def fixture(reference_dir):
    return Fixture(reference_dir, reference_dir / "tilevae" / "tilevae.safetensors")


@pytest.fixture(scope="module")
def small():
    mx.random.seed(0)
    vae = AutoencoderKL(SMALL)
    mx.eval(vae.parameters())
    return vae


def test_tile_boxes_match_official(fixture):
    for name, size, tile, dec in (
        ("encoder", fixture["x"].shape[2:], fixture.meta["encoder_tile"], False),
        ("decoder", fixture["z"].shape[2:], fixture.meta["decoder_tile"], True),
    ):
        tiles, cols = split_tiles(*size, int(tile), dec)
        assert cols == 3
        np.testing.assert_array_equal([t.src for t in tiles], fixture[f"{name}_tile_in_bboxes"])
        np.testing.assert_array_equal([t.dst for t in tiles], fixture[f"{name}_tile_out_bboxes"])


def test_tiled_encoders_match_official(fixture, reference_dir):
    from supir_mlx.conformance import Context
    from supir_mlx.conformance.groups.vae import vae

    model = vae(Context(reference_dir))
    x, tile = to_nhwc(fixture["x"]), int(fixture.meta["encoder_tile"])
    for name, ours in (
        ("tiled_encoder_h", tiled_encoder_features(model, x, tile)),
        ("tiled_z_denoise", tiled_encode_with_denoise(model, x, tile)),
    ):
        ref = fixture[name]
        assert np.abs(to_nchw(ours) - ref).max() <= 1e-4 * np.abs(ref).max(), name
    # tiling really changes the result (shared statistics, per-tile attention)
    untiled = fixture["untiled_encoder_h"]
    assert np.abs(fixture["tiled_encoder_h"] - untiled).max() > 1e-3 * np.abs(untiled).max()


@pytest.mark.slow  # the tiled tiny decode takes ~45 s on a 2-core CPU
def test_tilevae_conformance(reference_dir):
    results = list(run(reference_dir, ["tilevae"]))
    assert len(results) == 1 and results[0].status == "PASS", results[0].line()


def test_small_input_is_untiled(small):
    x = mx.random.uniform(-1, 1, (1, 96, 80, 3))
    np.testing.assert_array_equal(np.array(tiled_forward(small.encoder, x, 32)), np.array(small.encoder(x)))
    z = mx.random.normal((1, 12, 16, 4))
    np.testing.assert_array_equal(np.array(tiled_decode(small, z, 6)), np.array(small.decode(z)))


def test_batch_items_are_independent(small):
    # statistics are per batch item, as in the official get_var_mean
    x = mx.random.uniform(-1, 1, (2, 112, 72, 3))
    both = np.array(tiled_forward(small.encoder, x, 16))
    for i in range(2):
        one = np.array(tiled_forward(small.encoder, x[i : i + 1], 16))
        np.testing.assert_allclose(both[i : i + 1], one, rtol=1e-5, atol=1e-5)


def test_tiled_decode_bf16_close_to_fp32(small):
    z = mx.random.normal((1, 28, 24, 4)) * 0.13025
    ref = np.array(tiled_decode(small, z, 4))
    half = AutoencoderKL(SMALL)
    half.update(small.parameters())
    half.set_dtype(mx.bfloat16)
    out = tiled_decode(half, z, 4)
    assert out.dtype == mx.float32
    rel = np.abs(np.array(out) - ref).max() / np.abs(ref).max()
    assert 0 < rel < 0.05


def test_bad_tile_sizes(small):
    x = mx.zeros((1, 128, 128, 3))
    with pytest.raises(ValueError, match="positive integer"):
        tiled_forward(small.encoder, x, 0)
    with pytest.raises(ValueError, match="multiples of 8"):
        tiled_forward(small.encoder, mx.zeros((1, 100, 100, 3)), 10)


def test_plan_prefers_untiled_then_largest_fitting_tile():
    cfg = VAEConfig()
    roomy = plan_tiles(cfg, 1024, 1024, 64 << 30)
    assert roomy.fits and roomy.encoder_tile >= 1024 and roomy.decoder_tile >= 128
    tight = plan_tiles(cfg, 4096, 4096, 8 << 30, dtype_size=2)
    assert tight.decoder_tile < 512 and tight.encoder_tile < 4096
    assert tight.decoder_bytes <= 8 << 30 or not tight.fits
    # at 4096^2 tiling needs far less than one untiled pass
    assert estimate_bytes(cfg, 4096, 4096, 64, True, 2) < estimate_bytes(cfg, 4096, 4096, 4096, True, 2)
    impossible = plan_tiles(cfg, 8192, 8192, 1 << 30)
    assert not impossible.fits
    with pytest.raises(ValueError, match="positive"):
        plan_tiles(cfg, 0, 512, 1 << 30)
