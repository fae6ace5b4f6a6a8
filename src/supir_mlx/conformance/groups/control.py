"""`control/`: GLVControl.forward -> the 10 control features hs_00..hs_09."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .. import Comparison, Context, Fixture, compare


def nhwc(a: np.ndarray) -> mx.array:
    return mx.array(np.ascontiguousarray(a.transpose(0, 2, 3, 1)))


def nchw(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).transpose(0, 3, 1, 2)


def controlled_unet(ctx: Context):
    """The official `model` (UNet + control encoder), shared with the other network groups."""
    from ...models.supir import ControlledUNet

    return ctx.component("controlled_unet", lambda: ControlledUNet(ctx.config()), "model.")


def control_model(ctx: Context):
    return controlled_unet(ctx).control_model


def run(fixture: Fixture, ctx: Context) -> list[Comparison]:
    hs = control_model(ctx)(
        nhwc(fixture["x_control"]),
        mx.array(fixture["timesteps"]),
        nhwc(fixture["xt"]),
        mx.array(fixture["context"]),
        mx.array(fixture["y"]),
    )
    mx.eval(hs)
    rtol = ctx.rtol("control")
    return [compare(f"hs_{i:02d}", nchw(h), fixture[f"hs_{i:02d}"], rtol) for i, h in enumerate(hs)]
