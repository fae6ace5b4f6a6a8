"""The SUPIR restoration flow on tensors: the official `batchify_denoise` and `batchify_sample`.

    x (LQ, [-1,1]) --denoise encoder--> _z --decoder--> x_stage1          (stage 1)
    caption + a_prompt / n_prompt --CLIP-L + bigG--> c, uc                 (conditioning; control = _z)
    noise * sqrt(1 + sigma_max^2) --restoration sampler (tiled)--> latent  (sampling)
    latent --decoder--> image --colour fix toward x_stage1--> out          (decode)

Every random draw comes from one NoiseSource in the official order: (1) the posterior sample of
encode_first_stage(x_stage1), (2) the initial latent, (3) the sampler's per-step draws. Images are NHWC
float32 in [-1, 1]; networks run in the dtype of their weights and hand back float32.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
import mlx.core as mx

from ..events import Event, EventCallback, StageClock
from ..models.supir import Condition, SUPIRModel
from ..sampling.denoiser import guided_denoiser
from ..sampling.dpmpp import sample_restore_dpmpp
from ..sampling.edm import sample_restore_edm
from ..sampling.noise import NoiseSource
from ..sampling.schedules import SamplerOptions, dpmpp_sigmas, initial_noise_scale, legacy_sigmas
from ..sampling.tiled import Tiling, auto_tiling, sample_tiled_restore_dpmpp, sample_tiled_restore_edm
from . import tiled_vae
from .colorfix import adain_color_fix, wavelet_color_fix
from .settings import RestoreSettings


@dataclass(frozen=True)
class VAETiles:
    """VAE tile sizes (encoder: image pixels, decoder: latent pixels); None runs that pass untiled.
    A tiled pass whose states would not fit `budget_bytes` keeps them on disk (None: always in RAM)."""

    encoder: int | None = None
    decoder: int | None = None
    budget_bytes: int | None = None


VAE_HINT = "the VAE overflowed: try --vae-dtype float32"


class NonFiniteError(RuntimeError):
    """NaN or Inf appeared in a restore: that image is stopped instead of writing garbage (one-line message)."""


def _require_finite(x: mx.array, where: str, hint: str) -> None:
    # One reduction and one sync per check: negligible next to the network call that produced `x`.
    if not mx.all(mx.isfinite(x)).item():
        raise NonFiniteError(f"NaN or Inf values appeared {where}; this image was stopped, nothing written ({hint})")


@dataclass
class StageStats:
    seconds: float = 0.0
    peak_bytes: int = 0


@dataclass
class Trace:
    """What a run measured and, when asked, the intermediate tensors (for conformance and debugging)."""

    keep: bool | tuple[str, ...] = False  # True: every intermediate and every step; or the names to keep
    tensors: dict[str, mx.array] = field(default_factory=dict)
    stages: dict[str, StageStats] = field(default_factory=dict)
    steps: list = field(default_factory=list)

    def wants(self, name: str) -> bool:
        return self.keep is True or (isinstance(self.keep, tuple) and name in self.keep)

    def store(self, name: str, value: mx.array) -> None:
        if self.wants(name):
            self.tensors[name] = value

    def stage(self, name: str) -> "_StageTimer":
        return _StageTimer(self, name)


class _StageTimer:
    def __init__(self, trace: Trace, name: str):
        self.trace, self.name = trace, name

    def __enter__(self):
        mx.reset_peak_memory()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        s = self.trace.stages.setdefault(self.name, StageStats())
        s.seconds += time.perf_counter() - self.t0
        s.peak_bytes = max(s.peak_bytes, mx.get_peak_memory())


class _InDtype:
    """Runs the control + diffusion networks in their weight dtype; the samplers keep float32 latents."""

    def __init__(self, network, dtype: mx.Dtype):
        self.network, self.dtype = network, dtype

    def __call__(self, x: mx.array, timesteps: mx.array, cond: Condition, control_scale: float) -> mx.array:
        return self.network(x.astype(self.dtype), timesteps, cond, control_scale).astype(mx.float32)


def bound_cache(limit: int) -> None:
    """Before a stage allocates (or drops weights): MLX's buffer cache gets the stage's limit, and what it holds
    above a lower limit goes back to the system now rather than at the next allocation."""
    mx.set_cache_limit(limit)
    if mx.get_cache_memory() > limit:
        mx.clear_cache()


def _bound_cache(limits: dict[str, int] | None, stage: str) -> None:
    if limits is not None:
        bound_cache(limits[stage])


def _dtype_of(module) -> mx.Dtype:
    from mlx.utils import tree_flatten

    for _, p in tree_flatten(module.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            return p.dtype
    return mx.float32


def _f32(x: mx.array) -> mx.array:
    return x.astype(mx.float32)


class SupirRunner:
    """The official flow over one loaded SUPIRModel (reusable across images: no state between runs)."""

    def __init__(self, model: SUPIRModel, residency=None):
        """`residency` (pipeline.residency.Residency) lets a staged run keep only each stage's weights."""
        self.model = model
        self.vae = model.first_stage_model
        self.vae_dtype = _dtype_of(self.vae)
        self.net_dtype = _dtype_of(model.model)
        self.residency = residency

    def use(self, staged: bool, *parts: str) -> None:
        """Before a stage: with a staged plan keep only `parts` in memory; otherwise keep everything."""
        if self.residency is None:
            return
        if staged:
            self.residency.use(*parts)
        else:
            self.residency.use_all()

    # ---------------------------------------------------------------------------------- VAE passes
    # `group` (mx.distributed): the tiles of a tiled pass are divided among the ranks (tiled_vae.tiled_forward)
    def encode_with_denoise(self, x: mx.array, tiles: VAETiles, group=None) -> mx.array:
        x = x.astype(self.vae_dtype)
        if tiles.encoder and tiled_vae.needs_tiling(x.shape[1], x.shape[2], tiles.encoder, False):
            return _f32(tiled_vae.tiled_encode_with_denoise(self.vae, x, tiles.encoder, tiles.budget_bytes, group))
        return _f32(self.vae.encode_with_denoise(x))

    def encode_sample(self, x: mx.array, noise: mx.array, tiles: VAETiles, group=None) -> mx.array:
        x = x.astype(self.vae_dtype)
        if tiles.encoder and tiled_vae.needs_tiling(x.shape[1], x.shape[2], tiles.encoder, False):
            return _f32(tiled_vae.tiled_encode(self.vae, x, tiles.encoder, noise, tiles.budget_bytes, group))
        return _f32(self.vae.encode(x, noise))

    def decode(self, z: mx.array, tiles: VAETiles, group=None) -> mx.array:
        z = z.astype(self.vae_dtype)
        if tiles.decoder and tiled_vae.needs_tiling(z.shape[1], z.shape[2], tiles.decoder, True):
            return _f32(tiled_vae.tiled_decode(self.vae, z, tiles.decoder, tiles.budget_bytes, group))
        return _f32(self.vae.decode(z))

    def denoise_stage1(self, x: mx.array, tiles: VAETiles = VAETiles()) -> mx.array:
        """Official `batchify_denoise`: decode(encode_with_denoise(x)), the cleaned stage-1 image."""
        z = self.encode_with_denoise(x, tiles)
        mx.eval(z)
        out = self.decode(z, tiles)
        mx.eval(out)
        return out

    # ------------------------------------------------------------------------------------ sampling
    def sample(
        self,
        x: mx.array,
        captions: list[str],
        settings: RestoreSettings,
        noise: NoiseSource,
        *,
        tiling: Tiling | None | str = "auto",
        vae_tiles: VAETiles = VAETiles(),
        batched_cfg: bool = True,
        staged: bool = False,
        on_event: EventCallback | None = None,
        trace: Trace | None = None,
        group=None,
        cache_limits: dict[str, int] | None = None,
    ) -> mx.array:
        """Official `batchify_sample(x, captions, ...)`: the restored images [N,H,W,3] in [-1,1], not clamped.

        x is [B,H,W,3]; with num_samples > 1 there must be one image, repeated num_samples times (as
        officially, each sample gets its own noise). `tiling` "auto" tiles the latent only when it is
        larger than one official 128-pixel tile; a Tiling forces it; None never tiles. `staged` keeps only
        the weights each stage needs in memory (see pipeline.residency). `on_event` receives stage events
        (stage1, condition, sample, decode) and one step event per sampler step (supir_mlx.events). `group`
        (mx.distributed, several processes) divides the tiles of each sampling step and of the tiled VAE passes
        among them; every process gets the same output, bit for bit the single-process one. `cache_limits`
        (memory.Plan.cache_limits) bounds MLX's buffer cache stage by stage; None leaves it as it is.
        """
        s = settings
        trace = trace or Trace()
        report = StageClock(on_event)
        if len(captions) != x.shape[0]:
            raise ValueError(f"{len(captions)} captions for {x.shape[0]} images")
        if s.num_samples > 1:
            if x.shape[0] != 1:
                raise ValueError("num_samples > 1 needs exactly one input image")
            x = mx.repeat(x, s.num_samples, axis=0)
            captions = captions * s.num_samples

        with trace.stage("stage1"):
            _bound_cache(cache_limits, "stage1")
            self.use(staged, "vae")
            report("stage1", 0, 2)
            z_lq = self.encode_with_denoise(x, vae_tiles, group)
            mx.eval(z_lq)
            report("stage1", 1, 2)
            x_stage1 = self.decode(z_lq, vae_tiles, group)
            mx.eval(x_stage1)
            _require_finite(x_stage1, "in the stage-1 (denoising VAE) image", VAE_HINT)
            report("stage1", 2, 2, image=x_stage1)
            # Draw (1): officially always drawn; the encode itself is only needed for restoration guidance.
            posterior_noise = noise.next(z_lq.shape, mx.float32)
            z_stage1 = None
            if (s.sampler == "edm" and s.restore_cfg > 0) or trace.wants("z_stage1"):
                z_stage1 = self.encode_sample(x_stage1, posterior_noise, vae_tiles, group)
                mx.eval(z_stage1)
        trace.store("_z", z_lq)
        trace.store("x_stage1", x_stage1)
        if z_stage1 is not None:
            trace.store("z_stage1", z_stage1)

        with trace.stage("condition"):
            _bound_cache(cache_limits, "condition")
            self.use(staged, "vae", "text")
            report("condition", 0, 1)
            (c_ctx, c_vec), (uc_ctx, uc_vec) = self.model.conditioner.prepare_condition(
                captions, s.positive_prompt, s.negative_prompt
            )
            d = self.net_dtype
            cond = Condition(c_ctx.astype(d), c_vec.astype(d), z_lq.astype(d))
            uncond = Condition(uc_ctx.astype(d), uc_vec.astype(d), z_lq.astype(d))
            mx.eval(cond.crossattn, cond.vector, uncond.crossattn, uncond.vector)
            report("condition", 1, 1)
        for name, v in (("c_crossattn", c_ctx), ("c_vector", c_vec), ("uc_crossattn", uc_ctx), ("uc_vector", uc_vec)):
            trace.store(name, _f32(v))

        with trace.stage("sample"):
            _bound_cache(cache_limits, "sample")
            self.use(staged, "vae", "denoiser")
            latent = self._sample(z_lq, z_stage1, cond, uncond, s, noise, tiling, batched_cfg, report, on_event, trace,
                                  group)
        trace.store("samples_latent", latent)

        with trace.stage("decode"):
            _bound_cache(cache_limits, "decode")
            self.use(staged, "vae")
            report("decode", 0, 1)
            decoded = self.decode(latent, vae_tiles, group)
            mx.eval(decoded)
            _require_finite(decoded, "while decoding the sampled latent", VAE_HINT)
            trace.store("decoded_before_colorfix", decoded)
            if s.color_fix == "wavelet":
                out = wavelet_color_fix(decoded, x_stage1)
            elif s.color_fix == "adain":
                out = adain_color_fix(decoded, x_stage1)
            else:
                out = decoded
            mx.eval(out)
            report("decode", 1, 1)
        trace.store("out", out)
        return out

    def _sample(self, z_lq, z_stage1, cond, uncond, s, noise, tiling, batched_cfg, report, on_event, trace,
                group) -> mx.array:
        options = SamplerOptions(
            cfg=s.cfg, cfg_start=s.cfg_start, linear_cfg=s.linear_cfg, control_scale=s.control_scale,
            control_start=s.control_start, linear_control=s.linear_control, restore_cfg=s.restore_cfg,
            s_churn=s.s_churn, s_noise=s.s_noise, eta=s.eta,
        )
        x = noise.next(z_lq.shape, mx.float32) * initial_noise_scale()  # draw (2)
        if tiling == "auto":
            tiling = auto_tiling(z_lq.shape[1], z_lq.shape[2], s.tile_size or 128)
            if tiling is not None and s.tile_stride:
                tiling = replace(tiling, stride=s.tile_stride)
        denoise = guided_denoiser(_InDtype(self.model.model, self.net_dtype), cond, uncond, batched=batched_cfg)
        steps = s.steps
        n_tiles = len(tiling.windows(z_lq.shape[1], z_lq.shape[2])) if tiling is not None else 1
        # with a group this process runs every size-th tile: its share is its work
        mine = len(range(group.rank(), n_tiles, group.size())) if group is not None and tiling is not None else n_tiles
        keep_step = trace.steps.append if trace.wants("steps") else (lambda _: None)
        t0, tiles_done = time.perf_counter(), [0]
        report("sample", 0, steps * mine)

        def on_step(step):
            """After each whole step: the NaN/Inf guard, then the step event (with the latent and x0 for callbacks)."""
            _require_finite(step.x_out, f"at sampler step {step.index + 1} of {steps}",
                            "try a lower --cfg or --control-scale, or --dtype float32")
            keep_step(step)
            if tiling is None:
                report("sample", step.index + 1, steps)
            if on_event is not None:
                elapsed = time.perf_counter() - t0
                on_event(Event("step", {
                    "step": step.index + 1, "steps": steps, "sigma": float(sigmas[step.index]), "tiles": n_tiles,
                    "elapsed": round(elapsed, 3), "time_left": round(elapsed / (step.index + 1) * (steps - step.index - 1), 3),
                }, latent=step.x_out, denoised=step.denoised))

        def on_tile(_):
            tiles_done[0] += 1
            report("sample", tiles_done[0], steps * mine)

        sigmas = legacy_sigmas(steps) if s.sampler == "edm" else dpmpp_sigmas(steps)
        if tiling is not None:
            if s.sampler == "edm":
                return sample_tiled_restore_edm(denoise, x, sigmas, options, tiling, z_stage1, noise, on_step, on_tile,
                                                group)
            return sample_tiled_restore_dpmpp(denoise, x, sigmas, options, tiling, noise, on_step, on_tile, group)
        if s.sampler == "edm":
            return sample_restore_edm(denoise, x, sigmas, options, z_stage1, noise, on_step)
        return sample_restore_dpmpp(denoise, x, sigmas, options, noise, on_step)
