"""`tiled_sampler/`: TiledRestoreEDMSampler runs with the real tiny network and the recorded draws."""

from __future__ import annotations

import numpy as np

from .. import Comparison, Context, Fixture, compare, compare_exact
from ...sampling.denoiser import DenoiseFn
from ...sampling.schedules import legacy_sigmas
from ...sampling.tiled import Tiling, sample_tiled_restore_edm
from .control import nchw, nhwc
from .sampler import EDM_FIELDS, compare_steps, draws, initial_latent, network_denoiser, options


def tiled_edm_case(fixture: Fixture, denoise: DenoiseFn, rtol: float) -> list[Comparison]:
    steps = int(fixture.param("steps"))
    sigmas = legacy_sigmas(steps)
    tiling = Tiling(int(fixture.param("tile_size")), int(fixture.param("tile_stride")))
    x = initial_latent(fixture)
    _, h, w, c = x.shape
    noise = draws(fixture, "randn_")
    tiles: list = []
    out = sample_tiled_restore_edm(
        denoise, x, sigmas, options(fixture), tiling, nhwc(fixture["x_center"]), noise, tile_callback=tiles.append
    )
    weights = np.broadcast_to(tiling.weights(h, w), (1, c, *tiling.tile_shape(h, w)))
    return [
        compare("sampler_sigmas", sigmas, fixture["sampler_sigmas"], rtol),
        compare("tile_weights", weights, fixture["tile_weights"], rtol),
        compare_exact("tile_coords", np.array(tiling.windows(h, w)), fixture["tile_coords"]),
        compare("out", nchw(out), fixture["out"], rtol),
        compare_exact("randn_draws_used", noise.count, np.array(len(noise.draws))),
        *compare_steps(fixture, tiles, "tilestep_", EDM_FIELDS, rtol),
    ]


def run(fixture: Fixture, ctx: Context) -> list[Comparison]:
    return tiled_edm_case(fixture, network_denoiser(fixture, ctx), ctx.rtol("tiled_sampler"))
