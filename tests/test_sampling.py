"""Sampler arithmetic against the official runs (recorded network outputs replayed), noise sources,
tiling rules, CFG batching."""

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from supir_mlx.conformance import Context, Fixture
from supir_mlx.conformance.groups.control import nhwc
from supir_mlx.conformance.groups.dpmpp import run_case, tiled_case
from supir_mlx.conformance.groups.sampler import edm_case
from supir_mlx.sampling.denoiser import DENOISER, denoise, guided_denoiser
from supir_mlx.sampling.dpmpp import sample_restore_dpmpp
from supir_mlx.sampling.edm import sample_restore_edm
from supir_mlx.sampling.noise import NoiseExhausted, ReplayNoise, SeededNoise
from supir_mlx.sampling.schedules import (
    SamplerOptions,
    dpmpp_sigmas,
    initial_noise_scale,
    karras_sigmas,
    legacy_sigmas,
)
from supir_mlx.sampling.tiled import Tiling, auto_tiling, sample_tiled_restore_dpmpp, sample_tiled_restore_edm

# Replaying the network outputs leaves only the sampler's float32 arithmetic, which matches the official
# one operation for operation: far tighter than the groups' 1e-3.
REPLAY_RTOL = 1e-5


def fixture(reference_dir, name):
    return Fixture(reference_dir, reference_dir / f"{name}.safetensors")


def replay(outputs, same_branches=False):
    """A DenoiseFn returning recorded outputs in call order ([uc, c] pairs, or post-CFG values for both)."""
    it = iter(outputs)

    def fn(x, sigma, control_scale, window=None):
        o = next(it)
        uc, c = (o, o) if same_branches else (o[0:1], o[1:2])
        return nhwc(uc), nhwc(c)

    return fn


def assert_all_ok(comparisons):
    bad = [c for c in comparisons if not c.ok]
    assert not bad, ", ".join(f"{c.output}: {c.max_abs:.2e} > {c.tol:.2e}" for c in bad)


@pytest.mark.parametrize(
    "name",
    [
        "sampler_A_8x8_churn0_rcfg4_cfg7.5",
        "sampler_B_8x8_churn5_linCFG_linCtrl",
        "sampler_C_8x12_churn5_rcfg-1_linCFG",
        "sampler_D_8x12_churn0_rcfg2_linCtrl",
    ],
)
def test_edm_replayed_network(reference_dir, name):
    f = fixture(reference_dir, f"sampler/{name}")
    assert_all_ok(edm_case(f, replay(f["step_network_out_uc_c"]), REPLAY_RTOL))


@pytest.mark.parametrize(
    "name",
    [
        "dpmpp_run_DP1_8x8_8steps_eta1_cfg2",
        "dpmpp_run_DP2_8x12_6steps_eta1_snoise1.05_linCFG",
        "dpmpp_run_DP3_8x8_5steps_eta0.5_linCFG",
    ],
)
def test_dpmpp_replayed_network(reference_dir, name):
    f = fixture(reference_dir, f"dpmpp/{name}")
    assert_all_ok(run_case(f, replay(f["step_network_out_uc_c"]), REPLAY_RTOL))


def test_tiled_dpmpp_replayed_denoised(reference_dir):
    # Only the post-CFG denoised of each tile is recorded: returned for both branches, CFG gives it back.
    f = fixture(reference_dir, "dpmpp/dpmpp_tiled_DPT1_12x16_t8s4_6steps")
    assert_all_ok(tiled_case(f, replay(f["tilestep_denoised"], same_branches=True), REPLAY_RTOL))


def test_replay_detects_wrong_arithmetic(reference_dir):
    f = fixture(reference_dir, "sampler/sampler_B_8x8_churn5_linCFG_linCtrl")
    f.params = dict(f.params, s_noise=1.0)  # the run used 1.01
    bad = [c.output for c in edm_case(f, replay(f["step_network_out_uc_c"]), REPLAY_RTOL) if not c.ok]
    # (not `out`: the last step returns the replayed denoised whatever x was)
    assert {"step_x_churned", "step_x_out"} <= set(bad)


# --- schedules -------------------------------------------------------------------------------------


def test_dpmpp_sigma_min_depends_on_steps():
    for n, t_min in [(8, 124), (20, 49), (4, 249)]:
        karras = dpmpp_sigmas(n)
        assert len(karras) == n + 1 and karras[-1] == 0
        assert np.all(np.diff(karras) < 0)
        assert DENOISER.index(karras[n - 1]) == t_min
        assert DENOISER.index(karras[0]) == 999
    assert DENOISER.index(dpmpp_sigmas(8)[:-1]).tolist() == [999, 927, 842, 737, 607, 448, 273, 124]


def test_karras_endpoints():
    s = karras_sigmas(10, 0.5, 10.0)
    np.testing.assert_allclose([s[0], s[-2]], [10.0, 0.5], rtol=1e-6)
    assert s.dtype == np.float32


def test_initial_scale_uses_legacy_sigma_max():
    assert initial_noise_scale() == pytest.approx(float(np.sqrt(1 + legacy_sigmas(8)[0] ** 2)), rel=1e-7)
    assert initial_noise_scale() == pytest.approx(14.648813, abs=1e-6)


def test_options_ramps():
    o = SamplerOptions(cfg=7.5, cfg_start=4.0, linear_cfg=True, control_scale=0.8, control_start=0.2, linear_control=True)
    assert float(o.cfg_scale(0.0)) == 7.5
    assert float(o.cfg_scale(14.6146)) == pytest.approx(4.0, abs=1e-6)
    assert o.control_scale_at(14.6146) == pytest.approx(0.2)
    flat = replace(o, linear_cfg=False, linear_control=False)
    assert float(flat.cfg_scale(10.0)) == 7.5 and flat.control_scale_at(10.0) == 0.8


# --- noise -----------------------------------------------------------------------------------------


def test_seeded_noise_reproducible_per_draw_index():
    a, b = SeededNoise(7), SeededNoise(7)
    a.next((3, 5))
    b.next((1, 2, 2, 4))  # another shape first: draw 1 must not care
    assert mx.array_equal(a.next((1, 4, 4, 4)), b.next((1, 4, 4, 4)))
    assert not mx.array_equal(SeededNoise(7).next((64,)), SeededNoise(8).next((64,)))
    c = SeededNoise(7)
    assert not mx.array_equal(c.next((64,)), c.next((64,)))


def test_seeded_noise_is_standard_normal_in_every_dtype():
    n = SeededNoise(0)
    x = np.array(n.next((200_000,)))
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01
    h16 = SeededNoise(3).next((1000,), mx.float16)
    h32 = SeededNoise(3).next((1000,))
    assert h16.dtype == mx.float16 and mx.array_equal(h16, h32.astype(mx.float16))


def test_replay_noise_errors():
    r = ReplayNoise([np.zeros((1, 2, 2, 4), np.float32)])
    with pytest.raises(ValueError, match="shape"):
        r.next((1, 4, 4, 4))
    assert r.next((1, 2, 2, 4)).shape == (1, 2, 2, 4) and r.remaining == 0
    with pytest.raises(NoiseExhausted, match="only 1 supplied"):
        r.next((1, 2, 2, 4))


# --- denoiser and CFG batching -----------------------------------------------------------------------


def tiny_network(reference_dir):
    from supir_mlx.models.supir import ControlledUNet

    ctx = Context(reference_dir)
    return ctx.component("controlled_unet", lambda: ControlledUNet(ctx.config()), "model.")


def conditions(reference_dir, h=8, w=8):
    from supir_mlx.models.supir import Condition

    f = fixture(reference_dir, "sampler/sampler_A_8x8_churn0_rcfg4_cfg7.5")
    control = nhwc(f["control"])[:, :h, :w]
    c = Condition(mx.array(f["c_crossattn"]), mx.array(f["c_vector"]), control)
    uc = Condition(mx.array(f["uc_crossattn"]), mx.array(f["uc_vector"]), control)
    return c, uc


def test_cfg_batch_of_two_equals_two_calls(reference_dir):
    net = tiny_network(reference_dir)
    c, uc = conditions(reference_dir)
    x = mx.random.normal((1, 8, 8, 4), key=mx.random.key(1)) * 3
    uc2, c2 = denoise(net, x, 3.3, c, uc, 0.7, batched=True)
    uc1, c1 = denoise(net, x, 3.3, c, uc, 0.7, batched=False)
    np.testing.assert_allclose(np.array(uc1), np.array(uc2), atol=1e-5)
    np.testing.assert_allclose(np.array(c1), np.array(c2), atol=1e-5)
    assert float(mx.abs(c1 - uc1).max()) > 1e-3  # the branches really differ: the order is tested


def test_denoiser_quantizes_sigma_for_the_network():
    seen = {}

    def net(x, t, cond, cs):
        seen["t"], seen["x"] = np.array(t), x
        return mx.zeros_like(x)

    x = mx.ones((2, 2, 2, 4))
    out = DENOISER(net, x, np.float32([0.5, 20.0]), None, 1.0)
    assert seen["t"].tolist() == [169, 999]
    c_in = DENOISER.scalings(np.float32([0.5, 20.0]))[2]
    np.testing.assert_allclose(np.array(seen["x"])[:, 0, 0, 0], c_in, rtol=1e-7)
    assert mx.array_equal(out, x)  # eps = 0: c_skip = 1


def test_guided_denoiser_cuts_the_control_latent(reference_dir):
    seen = []

    def net(x, t, cond, cs):
        seen.append(cond.control.shape)
        return mx.zeros_like(x)

    c, uc = conditions(reference_dir)
    fn = guided_denoiser(net, c, uc)
    fn(mx.zeros((1, 4, 6, 4)), 1.0, 1.0, (2, 6, 1, 7))
    assert seen == [(2, 4, 6, 4)]


# --- tiling ------------------------------------------------------------------------------------------


def test_sliding_windows_official_rule():
    t = Tiling(8, 4)
    assert t.windows(12, 16) == [(hi, hi + 8, wi, wi + 8) for hi in (0, 4) for wi in (0, 4, 8)]
    # (13 - 8) % 4 != 0: a last window flush with the edge
    assert [w[0] for w in t.windows(13, 8)] == [0, 4, 5]
    assert Tiling(8, 8).windows(16, 16) == [(0, 8, 0, 8), (0, 8, 8, 16), (8, 16, 0, 8), (8, 16, 8, 16)]
    # thinner than a tile: one band of the latent's own thickness
    assert Tiling(8, 4).windows(6, 12) == [(0, 6, 0, 8), (0, 6, 4, 12)]


def test_windows_cover_every_pixel():
    for h, w, size, stride in [(40, 72, 16, 8), (33, 17, 16, 5), (128, 200, 128, 64)]:
        hit = np.zeros((h, w), int)
        for h0, h1, w0, w1 in Tiling(size, stride).windows(h, w):
            hit[h0:h1, w0:w1] += 1
        assert hit.min() >= 1


def test_gaussian_weights_asymmetric_midpoints():
    w = Tiling(8, 4).weights(12, 16)
    assert w.shape == (8, 8) and w.dtype == np.float64
    assert np.argmax(w[:, 0]) == 4  # rows peak at T/2
    np.testing.assert_allclose(w[0], w[0, ::-1])  # columns symmetric about (T-1)/2


def test_auto_tiling():
    assert auto_tiling(128, 96) is None
    assert auto_tiling(129, 64) == Tiling(128, 64)
    assert auto_tiling(256, 256, max_tile=100) == Tiling(96, 48)
    with pytest.raises(ValueError):
        Tiling(8, 0)


def analytic_denoise(x, sigma, control_scale, window=None):
    """A smooth stand-in network: two different branches, depending on x and sigma."""
    return 0.6 * x - 0.05 * sigma, 0.8 * x + 0.02 * sigma


def test_one_tile_equals_untiled_edm():
    x0 = SeededNoise(5).next((1, 8, 12, 4)) * initial_noise_scale()
    x_center = SeededNoise(6).next((1, 8, 12, 4))
    opts = SamplerOptions(s_churn=5, restore_cfg=2.0, linear_control=True, control_start=0.3)
    sigmas = legacy_sigmas(5)
    whole = sample_restore_edm(analytic_denoise, x0, sigmas, opts, x_center, SeededNoise(9))
    tiles = []
    tiled = sample_tiled_restore_edm(
        analytic_denoise, x0, sigmas, opts, Tiling(16, 8), x_center, SeededNoise(9), tile_callback=tiles.append
    )
    assert len(tiles) == 5 and tiles[0].window == (0, 8, 0, 12)
    np.testing.assert_allclose(np.array(tiled), np.array(whole), rtol=1e-5, atol=1e-5)


def test_one_tile_equals_untiled_dpmpp():
    x0 = SeededNoise(5).next((1, 8, 8, 4)) * initial_noise_scale()
    sigmas = dpmpp_sigmas(6)
    opts = SamplerOptions(eta=0.7)
    whole = sample_restore_dpmpp(analytic_denoise, x0, sigmas, opts, SeededNoise(3))
    tiled = sample_tiled_restore_dpmpp(analytic_denoise, x0, sigmas, opts, Tiling(8, 4), SeededNoise(3))
    np.testing.assert_allclose(np.array(tiled), np.array(whole), rtol=1e-5, atol=1e-5)


def test_tiles_blend_to_a_constant_field():
    # Every tile returns the same constant: any weighting must give that constant everywhere.
    def const(x, sigma, cs, window=None):
        v = mx.full(x.shape, 0.25)
        return v, v

    steps = []
    out = sample_tiled_restore_dpmpp(const, mx.zeros((1, 12, 20, 4)), dpmpp_sigmas(1), SamplerOptions(), Tiling(8, 4), None, steps.append)
    np.testing.assert_allclose(np.array(out), 0.25, rtol=1e-6)
    assert len(steps) == 1


# --- sampler guards --------------------------------------------------------------------------------


def test_dpmpp_last_step_is_denoised_even_with_eta_0():
    # Officially eta = 0 gives 0 * inf = NaN at the last step; the limit is the denoised estimate.
    x0 = SeededNoise(1).next((1, 4, 4, 4))
    out = sample_restore_dpmpp(analytic_denoise, x0, dpmpp_sigmas(4), SamplerOptions(eta=0.0), SeededNoise(2))
    assert np.isfinite(np.array(out)).all()


def test_edm_input_errors():
    x = mx.zeros((1, 4, 4, 4))
    with pytest.raises(ValueError, match="x_center"):
        sample_restore_edm(analytic_denoise, x, legacy_sigmas(2), SamplerOptions(restore_cfg=4.0))
    with pytest.raises(ValueError, match="noise"):
        sample_restore_edm(analytic_denoise, x, legacy_sigmas(2), SamplerOptions(s_churn=5))
    with pytest.raises(ValueError, match="noise"):
        sample_restore_dpmpp(analytic_denoise, x, dpmpp_sigmas(4), SamplerOptions())


def test_callbacks_see_every_step():
    records = []
    sample_restore_edm(analytic_denoise, mx.ones((1, 4, 4, 4)), legacy_sigmas(3), SamplerOptions(), callback=records.append)
    assert [r.index for r in records] == [0, 1, 2]
    assert records[-1].next_sigma == 0
