"""`sigmas/`: the legacy DDPM schedule, n-step sigmas and timesteps, the LinearCFG and control ramps."""

from __future__ import annotations

import re

import numpy as np

from .. import Comparison, Context, Fixture, compare, compare_exact
from ...sampling.schedules import alphas_cumprod, legacy_sigmas, legacy_timesteps, linear_cfg, linear_control_scale


def run(fixture: Fixture, ctx: Context) -> list[Comparison]:
    rtol = ctx.rtol("sigmas")
    out = [compare("alphas_cumprod", alphas_cumprod(), fixture["alphas_cumprod"], rtol)]
    for key in fixture.tensors:
        if m := re.fullmatch(r"sigmas_(\d+)", key):
            out.append(compare(key, legacy_sigmas(int(m[1])), fixture[key], rtol))
        elif m := re.fullmatch(r"timesteps_(\d+)", key):
            out.append(compare_exact(key, legacy_timesteps(int(m[1])), fixture[key]))
        elif m := re.fullmatch(r"linear_cfg_(\d+)_start([\d.]+)_end([\d.]+)", key):
            sigmas = legacy_sigmas(int(m[1]))[:-1]
            out.append(compare(key, linear_cfg(sigmas, float(m[2]), float(m[3])), fixture[key], rtol))
        elif m := re.fullmatch(r"linear_control_(\d+)_cs([\d.]+)_start([\d.]+)", key):
            sigmas = legacy_sigmas(int(m[1]))[:-1]
            ours = np.array([linear_control_scale(s, float(m[2]), float(m[3])) for s in sigmas])
            out.append(compare(key, ours, fixture[key], rtol))
    return out
