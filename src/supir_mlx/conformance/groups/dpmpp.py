"""`dpmpp/`: the restoration DPM++ 2M SDE: its sigma and coefficient tables, runs with the real tiny
network and the recorded Brownian-tree outputs (replayed), and the tiled variant."""

from __future__ import annotations

import numpy as np

from .. import Comparison, Context, Fixture, compare, compare_exact
from ...sampling.denoiser import DENOISER, DenoiseFn
from ...sampling.dpmpp import dpmpp_coefficients, sample_restore_dpmpp
from ...sampling.schedules import dpmpp_sigmas, initial_noise_scale, legacy_sigmas
from ...sampling.tiled import Tiling, sample_tiled_restore_dpmpp
from .control import nchw
from .sampler import compare_steps, draws, initial_latent, network_denoiser, options, scalar, tensor

COEFFICIENTS = ("h", "r", "mult1", "mult2", "mult3", "mult4")

DPM_FIELDS = {
    "x_in": tensor(lambda r: r.x_in),
    "denoised": tensor(lambda r: r.denoised),
    "x_out": tensor(lambda r: r.x_out),
    "sigma": scalar(lambda r: r.sigma),
    "next_sigma": scalar(lambda r: r.next_sigma),
    "previous_sigma": scalar(lambda r: r.previous_sigma),
    **{name: scalar(lambda r, name=name: getattr(r.coefficients, name)) for name in COEFFICIENTS},
    "cfg_scale": scalar(lambda r: r.cfg_scale),
    "control_scale": scalar(lambda r: r.control_scale),
}


def sigmas_case(fixture: Fixture, rtol: float) -> list[Comparison]:
    out, rho = [], float(fixture.param("rho"))
    for n in fixture.param("steps"):
        legacy, karras = legacy_sigmas(n), dpmpp_sigmas(n, rho=rho)
        out += [
            compare(f"legacy_sigmas_{n}", legacy, fixture[f"legacy_sigmas_{n}"], rtol),
            compare(f"karras_sigmas_{n}", karras, fixture[f"karras_sigmas_{n}"], rtol),
            compare(f"karras_sigma_min_max_{n}", [legacy[-2], legacy[0]], fixture[f"karras_sigma_min_max_{n}"], rtol),
            compare_exact(f"karras_idx_{n}", DENOISER.index(karras[:-1]), fixture[f"karras_idx_{n}"]),
            compare(f"karras_sigmas_quantized_{n}", DENOISER.quantize(karras[:-1]), fixture[f"karras_sigmas_quantized_{n}"], rtol),
            compare(f"init_scale_{n}", [initial_noise_scale()], fixture[f"init_scale_{n}"], rtol),
        ]
        for eta in fixture.param("etas"):
            ks = [dpmpp_coefficients(karras, i, eta) for i in range(n)]
            for name in COEFFICIENTS:
                key = f"coef_{n}_eta{eta:g}_{name}"
                out.append(compare(key, [getattr(k, name) for k in ks], fixture[key], rtol))
    return out


def run_case(fixture: Fixture, denoise: DenoiseFn, rtol: float) -> list[Comparison]:
    steps = int(fixture.param("steps"))
    sigmas = dpmpp_sigmas(steps)
    noise = draws(fixture, "noise_sampler_")
    records: list = []
    out = sample_restore_dpmpp(denoise, initial_latent(fixture), sigmas, options(fixture), noise, records.append)
    fields = dict(
        DPM_FIELDS,
        network_out_uc_c=lambda r: np.concatenate([nchw(r.uncond), nchw(r.cond)]),
        eps_noise_passed=lambda r: np.int64(r.noise_used),
    )
    return [
        compare("karras_sigmas", sigmas, fixture["karras_sigmas"], rtol),
        compare("out", nchw(out), fixture["out"], rtol),
        compare_exact("noise_sampler_draws_used", noise.count, np.array(len(noise.draws))),
        *compare_steps(fixture, records, "step_", fields, rtol),
    ]


def tiled_case(fixture: Fixture, denoise: DenoiseFn, rtol: float) -> list[Comparison]:
    steps = int(fixture.param("steps"))
    sigmas = dpmpp_sigmas(steps)
    tiling = Tiling(int(fixture.param("tile_size")), int(fixture.param("tile_stride")))
    x = initial_latent(fixture)
    _, h, w, c = x.shape
    noise = draws(fixture, "noise_sampler_")
    steps_done: list = []
    tiles: list = []
    out = sample_tiled_restore_dpmpp(
        denoise, x, sigmas, options(fixture), tiling, noise, steps_done.append, tiles.append
    )
    weights = np.broadcast_to(tiling.weights(h, w), (1, c, *tiling.tile_shape(h, w)))
    fields = dict(
        DPM_FIELDS,
        # NaN at the first step, where there is no previous denoised
        old_denoised_in=lambda r: nchw(r.old_denoised) if r.old_denoised is not None else np.full_like(nchw(r.x_in), np.nan),
    )
    return [
        compare("karras_sigmas", sigmas, fixture["karras_sigmas"], rtol),
        compare("tile_weights", weights, fixture["tile_weights"], rtol),
        compare_exact("tile_coords", np.array(tiling.windows(h, w)), fixture["tile_coords"]),
        compare("out", nchw(out), fixture["out"], rtol),
        compare_exact("noise_sampler_draws_used", noise.count, np.array(len(noise.draws))),
        *compare_steps(fixture, steps_done, "step_", {"x_in": tensor(lambda s: s.x_in), "x_out": tensor(lambda s: s.x_out)}, rtol),
        compare("step_old_denoised_blended", np.stack([nchw(s.denoised) for s in steps_done[:-1]]), fixture["step_old_denoised_blended"], rtol),
        *compare_steps(fixture, tiles, "tilestep_", fields, rtol),
    ]


def run(fixture: Fixture, ctx: Context) -> list[Comparison]:
    rtol = ctx.rtol("dpmpp")
    name = fixture.path.stem
    if name.startswith("dpmpp_sigmas"):
        return sigmas_case(fixture, 1e-6 if ctx.rtol_override is None else rtol)
    if name.startswith("dpmpp_pipeline_"):
        from .pipeline import run_pipeline

        return run_pipeline(fixture, ctx, "dpmpp", rtol)
    denoise = network_denoiser(fixture, ctx)
    if name.startswith("dpmpp_tiled_"):
        return tiled_case(fixture, denoise, rtol)
    return run_case(fixture, denoise, rtol)
