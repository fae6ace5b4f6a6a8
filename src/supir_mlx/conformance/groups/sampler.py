"""`sampler/`: RestoreEDMSampler runs with the real tiny network and the recorded churn draws.

Also the helpers the other sampling groups share: options from the case's params, the network, the
conditions, the per-step tensor stacking.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

from .. import Comparison, Context, Fixture, compare, compare_exact
from ...sampling.denoiser import DenoiseFn, guided_denoiser
from ...sampling.edm import sample_restore_edm
from ...sampling.noise import ReplayNoise
from ...sampling.schedules import SamplerOptions, initial_noise_scale, legacy_sigmas
from .control import nchw, nhwc


def flag(v) -> bool:
    return v is True or str(v).lower() == "true"


def options(fixture: Fixture) -> SamplerOptions:
    p = fixture.param
    return SamplerOptions(
        cfg=float(p("cfg")),
        cfg_start=float(p("cfg_start")),
        linear_cfg=flag(p("linear_cfg")),
        control_scale=float(p("control_scale")),
        control_start=float(p("control_start")),
        linear_control=flag(p("linear_control")),
        restore_cfg=float(p("restore_cfg")),
        s_churn=float(p("s_churn")),
        s_noise=float(p("s_noise")),
        # eta only moves the DPM++ sampler; the EDM cases do not record it and never read it
        eta=float(p("eta")) if "eta" in fixture.params else SamplerOptions.eta,
    )


def network_denoiser(fixture: Fixture, ctx: Context) -> DenoiseFn:
    """The official denoiser on the tiny ControlledUNet, with the fixture's conditions."""
    from ...models.supir import Condition, ControlledUNet

    net = ctx.component("controlled_unet", lambda: ControlledUNet(ctx.config()), "model.")
    control = nhwc(fixture["control"])

    def condition(prefix: str) -> Condition:
        return Condition(mx.array(fixture[f"{prefix}_crossattn"]), mx.array(fixture[f"{prefix}_vector"]), control)

    return guided_denoiser(net, condition("c"), condition("uc"))


def draws(fixture: Fixture, prefix: str) -> ReplayNoise:
    keys = sorted(k for k in fixture.tensors if re.fullmatch(rf"{prefix}\d+", k))
    return ReplayNoise([nhwc(fixture[k]) for k in keys])


def initial_latent(fixture: Fixture) -> mx.array:
    return nhwc(fixture["noise"]) * initial_noise_scale()


def stack(records: Sequence, get: Callable) -> np.ndarray:
    """Per-step tensors with a leading step axis, NCHW like the fixture."""
    return np.stack([get(r) for r in records])


def tensor(get: Callable) -> Callable:
    return lambda r: nchw(get(r))


def scalar(get: Callable) -> Callable:
    return lambda r: np.float64(get(r))


def compare_steps(fixture: Fixture, records: Sequence, prefix: str, fields: dict[str, Callable], rtol: float) -> list[Comparison]:
    return [compare(f"{prefix}{name}", stack(records, get), fixture[f"{prefix}{name}"], rtol) for name, get in fields.items()]


EDM_FIELDS = {
    "x_in": tensor(lambda r: r.x_in),
    "x_out": tensor(lambda r: r.x_out),
    "sigma": scalar(lambda r: r.sigma),
    "next_sigma": scalar(lambda r: r.next_sigma),
    "sigma_hat": scalar(lambda r: r.sigma_hat),
    "gamma": scalar(lambda r: r.gamma),
    "control_scale": scalar(lambda r: r.control_scale),
    "cfg_scale": scalar(lambda r: r.cfg_scale),
}


def edm_case(fixture: Fixture, denoise: DenoiseFn, rtol: float) -> list[Comparison]:
    """Run the fixture's EDM case with `denoise` and compare the output and every per-step tensor."""
    steps = int(fixture.param("steps"))
    sigmas = legacy_sigmas(steps)
    noise = draws(fixture, "randn_")
    records: list = []
    out = sample_restore_edm(
        denoise, initial_latent(fixture), sigmas, options(fixture), nhwc(fixture["x_center"]), noise, records.append
    )
    fields = dict(
        EDM_FIELDS,
        x_churned=tensor(lambda r: r.x_churned),
        network_out_uc_c=lambda r: np.concatenate([nchw(r.uncond), nchw(r.cond)]),
        denoised_cfg=tensor(lambda r: r.denoised),
    )
    return [
        compare("sampler_sigmas", sigmas, fixture["sampler_sigmas"], rtol),
        compare("out", nchw(out), fixture["out"], rtol),
        compare_exact("randn_draws_used", noise.count, np.array(len(noise.draws))),
        *compare_steps(fixture, records, "step_", fields, rtol),
    ]


def run(fixture: Fixture, ctx: Context) -> list[Comparison]:
    return edm_case(fixture, network_denoiser(fixture, ctx), ctx.rtol("sampler"))
