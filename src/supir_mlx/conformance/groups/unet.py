"""`unet/`: LightGLVUNet.forward(x, t, context, y, control=hs, control_scale) -> eps."""

from __future__ import annotations

import mlx.core as mx

from .. import Comparison, Context, Fixture, compare
from .control import controlled_unet, nchw, nhwc


def diffusion_model(ctx: Context):
    return controlled_unet(ctx).diffusion_model


def run(fixture: Fixture, ctx: Context) -> list[Comparison]:
    n = sum(1 for k in fixture.tensors if k.startswith("control_"))
    out = diffusion_model(ctx)(
        nhwc(fixture["x"]),
        mx.array(fixture["timesteps"]),
        mx.array(fixture["context"]),
        mx.array(fixture["y"]),
        [nhwc(fixture[f"control_{i:02d}"]) for i in range(n)],
        control_scale=float(fixture.param("control_scale")),
    )
    return [compare("out", nchw(out), fixture["out"], ctx.rtol("unet"))]
