"""`denoiser/`: sigma quantization and eps scalings; one denoiser call on the real tiny network."""

from __future__ import annotations

import mlx.core as mx

from .. import Comparison, Context, Fixture, compare, compare_exact
from ...sampling.denoiser import DENOISER
from .control import nchw, nhwc


def scalings_case(fixture: Fixture, rtol: float) -> list[Comparison]:
    sigma = fixture["sigma"]
    c_skip, c_out, c_in = DENOISER.scalings(sigma)
    idx = DENOISER.index(sigma)
    return [
        compare("sigmas_1000", DENOISER.sigmas, fixture["sigmas_1000"], rtol),
        compare_exact("idx", idx, fixture["idx"]),
        compare_exact("c_noise_idx", idx, fixture["c_noise_idx"]),
        compare("sigma_quantized", DENOISER.quantize(sigma), fixture["sigma_quantized"], rtol),
        compare("c_skip", c_skip, fixture["c_skip"], rtol),
        compare("c_out", c_out, fixture["c_out"], rtol),
        compare("c_in", c_in, fixture["c_in"], rtol),
    ]


def call_case(fixture: Fixture, ctx: Context) -> list[Comparison]:
    from ...models.supir import Condition, ControlledUNet

    net = ctx.component("controlled_unet", lambda: ControlledUNet(ctx.config()), "model.")
    cond = Condition(mx.array(fixture["crossattn"]), mx.array(fixture["vector"]), nhwc(fixture["control"]))
    out = DENOISER(net, nhwc(fixture["input"]), fixture["sigma"], cond, float(fixture.param("control_scale")))
    return [compare("out", nchw(out), fixture["out"], ctx.rtol("denoiser"))]


def run(fixture: Fixture, ctx: Context) -> list[Comparison]:
    if fixture.path.stem == "denoiser_scalings":
        return scalings_case(fixture, ctx.rtol("denoiser"))
    return call_case(fixture, ctx)
