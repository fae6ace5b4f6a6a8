import tempfile

import mlx.core as mx
import numpy as np
import pytest

from supir_mlx.config import VAEConfig
from supir_mlx.conformance import Fixture, run
from supir_mlx.conformance.groups.vae import to_nchw, to_nhwc
from supir_mlx.models.vae import AutoencoderKL
from supir_mlx.pipeline import tiled_vae
from supir_mlx.pipeline.tiled_vae import (
    GROUPS,
    _barriers,
    _run,
    _segments,
    estimate_bytes,
    network_ops,
    plan_tiles,
    spill_traffic,
    split_tiles,
    tiled_decode,
    tiled_encode_with_denoise,
    tiled_encoder_features,
    tiled_forward,
)

# Cheap random-weight VAEs for properties (GroupNorm(32) needs multiples of 32 channels); WIDE has
# channel changes, so 1x1 shortcut convolutions, like the SDXL VAE.
SMALL = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)
WIDE = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)


@pytest.fixture(scope="module")
def fixture(reference_dir):
    return Fixture(reference_dir, reference_dir / "tilevae" / "tilevae.safetensors")


def _random_vae(cfg: VAEConfig, seed: int) -> AutoencoderKL:
    mx.random.seed(seed)
    vae = AutoencoderKL(cfg)
    mx.eval(vae.parameters())
    return vae


@pytest.fixture(scope="module")
def small():
    return _random_vae(SMALL, 0)


@pytest.fixture(scope="module")
def wide():
    return _random_vae(WIDE, 1)


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


@pytest.fixture
def scratch_files(monkeypatch):
    """Every scratch file the tiled VAE opens."""
    opened = []
    make = tempfile.TemporaryFile

    def recording(*args, **kwargs):
        opened.append(make(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(tempfile, "TemporaryFile", recording)
    return opened


def test_spilled_states_give_identical_numbers(wide, scratch_files):
    z = mx.random.normal((1, 28, 24, 4)) * 0.13025
    x = mx.random.uniform(-1, 1, (1, 112, 136, 3))
    for is_decoder, run_tiled in (
        (True, lambda b: tiled_decode(wide, z, 4, b)),
        (False, lambda b: tiled_encoder_features(wide, x, 16, budget_bytes=b)),
    ):
        in_ram = np.array(run_tiled(64 << 30))
        assert not scratch_files
        spilled = np.array(run_tiled(1))
        np.testing.assert_array_equal(spilled, in_ram)
        # one file per barrier without a pending residual, each closed (so gone) once the next is complete
        assert len(scratch_files) == sum(not pending for *_, pending in _barriers(WIDE, is_decoder))
        assert all(f.closed for f in scratch_files)
        scratch_files.clear()


def test_spill_files_closed_on_error(wide, scratch_files, monkeypatch):
    calls, run = [], tiled_vae._run

    def failing(*args):  # Ctrl-C half-way through the network
        calls.append(1)
        if len(calls) == 40:
            raise KeyboardInterrupt
        return run(*args)

    monkeypatch.setattr(tiled_vae, "_run", failing)
    with pytest.raises(KeyboardInterrupt):
        tiled_decode(wide, mx.random.normal((1, 28, 24, 4)), 4, budget_bytes=1)
    assert len(calls) == 40 and len(scratch_files) >= 2 and all(f.closed for f in scratch_files)


@pytest.mark.parametrize("cfg", [SMALL, WIDE], ids=["small", "wide"])
def test_barrier_model_matches_network(cfg):
    # shapes only: the lazy graph is never evaluated
    vae = AutoencoderKL(cfg)
    stats = (mx.zeros((1, GROUPS)), mx.ones((1, GROUPS)))
    for net, is_decoder, x in ((vae.decoder, True, mx.zeros((1, 8, 8, cfg.z_channels))), (vae.encoder, False, mx.zeros((1, 64, 64, 3)))):
        h, res, seen = x, None, []
        for segment in _segments(network_ops(net))[:-1]:
            h, res = _run(segment, h, res, stats)
            held = h.shape[-1] + (0 if res is None else res.shape[-1])
            seen.append((held, 64 * 64 // (h.shape[1] * h.shape[2]), res is not None))
        assert seen == _barriers(cfg, is_decoder)


def test_spilled_plan_is_bounded_and_counts_disk():
    cfg = VAEConfig()
    # in RAM the states of a 4096^2 decode alone exceed 8 GB; spilled, the peak hardly depends on the size
    assert estimate_bytes(cfg, 4096, 4096, 64, True, 2) > 8 << 30
    small, big = (estimate_bytes(cfg, s, s, 64, True, 2, spill=True) for s in (2048, 8192))
    assert big - small == (8192**2 - 2048**2) * 3 * 4  # only the float32 output grows
    plan = plan_tiles(cfg, 8192, 8192, 8 << 30, dtype_size=2)
    assert plan.fits and plan.decoder_spill and plan.encoder_spill
    assert plan.decoder_bytes <= 8 << 30 and plan.disk_bytes > 8 << 30
    assert not plan_tiles(cfg, 1024, 1024, 64 << 30).decoder_spill
    # the largest stored barrier is the upsampled 256-channel activation at full resolution, next to the
    # 128-channel input of the following block
    disk, written, read = spill_traffic(cfg, 4096, 4096, 64, True, 2)
    total = sum(estimate_areas := [
        (t.src[1] - t.src[0]) * (t.src[3] - t.src[2]) * 64 for t in split_tiles(512, 512, 64, True)[0]
    ])
    assert disk == (256 + 128) * total * 2 and len(estimate_areas) == 64
    assert read > written > disk
