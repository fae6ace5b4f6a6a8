"""`pipeline/` (and `dpmpp/dpmpp_pipeline_*`): the official `batchify_sample` end to end on the tiny model.

The fixture's own LQ image, caption and kwargs go through `SupirRunner.sample`, with every recorded
random draw replayed in call order; every intermediate the fixture records is compared.
"""

from __future__ import annotations

import re

import mlx.core as mx

from .. import Comparison, Context, Fixture, compare
from ...pipeline.settings import RestoreSettings
from ...pipeline.supir import SupirRunner, Trace
from ...sampling.noise import ReplayNoise
from .control import nchw, nhwc

COLOR_FIX = {"Wavelet": "wavelet", "AdaIn": "adain", "None": "none"}


def settings_from_kwargs(kw: dict, ctx: Context, sampler: str) -> RestoreSettings:
    """The official batchify_sample kwargs as our settings (p_p / n_p 'default' = the config's prompts)."""
    cfg = ctx.config()
    linear_cfg = bool(kw["use_linear_CFG"])
    return RestoreSettings(
        sampler=sampler,
        steps=int(kw["num_steps"]),
        restore_cfg=float(kw["restoration_scale"]),
        s_churn=float(kw["s_churn"]),
        s_noise=float(kw["s_noise"]),
        cfg=float(kw["cfg_scale"]),
        cfg_start=float(kw["cfg_scale_start"]) if linear_cfg else float(kw["cfg_scale"]),
        linear_cfg=linear_cfg,
        control_scale=float(kw["control_scale"]),
        control_start=float(kw["control_scale_start"]),
        linear_control=bool(kw["use_linear_control_scale"]),
        color_fix=COLOR_FIX[kw["color_fix_type"]],
        seed=int(kw["seed"]),
        num_samples=int(kw["num_samples"]),
        positive_prompt=cfg.positive_prompt,
        negative_prompt=cfg.negative_prompt,
    )


def replayed_draws(fixture: Fixture) -> ReplayNoise:
    """randn_NN in call order, then (DPM++) the Brownian noise-sampler outputs."""
    def ordered(prefix: str) -> list[str]:
        return sorted(k for k in fixture.tensors if re.fullmatch(rf"{prefix}\d+", k))

    return ReplayNoise([nhwc(fixture[k]) for k in ordered("randn_") + ordered("noise_sampler_")])


def run_pipeline(fixture: Fixture, ctx: Context, sampler: str, rtol: float) -> list[Comparison]:
    settings = settings_from_kwargs(fixture.param("kwargs"), ctx, sampler)
    runner = ctx.cached("runner", lambda: SupirRunner(ctx.model()))
    trace = Trace(keep=True)
    noise = replayed_draws(fixture)
    out = runner.sample(mx.array(nhwc(fixture["x"])), [fixture.param("caption")], settings, noise, tiling=None, trace=trace)
    if noise.remaining:
        raise AssertionError(f"{noise.remaining} recorded draws were not used")
    t = trace.tensors
    results = [compare("out", nchw(out), fixture["out"], rtol)]
    for name in ("_z", "x_stage1", "z_stage1", "samples_latent", "decoded_before_colorfix"):
        if name in fixture:
            results.append(compare(name, nchw(t[name]), fixture[name], rtol))
    for name in ("c_crossattn", "c_vector", "uc_crossattn", "uc_vector"):
        if name in fixture:
            results.append(compare(name, t[name], fixture[name], rtol))
    for name, attr in (("step_x_out", "x_out"), ("step_x_in", "x_in")):
        if name in fixture and trace.steps:
            import numpy as np

            results.append(compare(name, np.stack([nchw(getattr(s, attr)) for s in trace.steps]), fixture[name], rtol))
    return results


def run(fixture: Fixture, ctx: Context) -> list[Comparison]:
    return run_pipeline(fixture, ctx, "edm", ctx.rtol("pipeline"))
