"""Per-stage wall time and peak memory of a SUPIR restore with full-size random-weight models (no download).

    python bench/bench_restore_memory.py --case 512:1024 --steps 2 --quant 4
    python bench/bench_restore_memory.py --calibrate all    # the measurements memory.py's formulas are fitted to
    python bench/bench_restore_memory.py --torch /path/to/other-venv/bin/python   # PyTorch speed ratio

Peak memory is MLX's allocator peak (mx.reset_peak_memory / mx.get_peak_memory) minus the memory already
held when the stage starts, plus the weights resident in that stage; next to it the planner's estimate
for the same settings. Stages that need modules not written yet are reported as skipped.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from supir_mlx import memory
from supir_mlx.config import SUPIRConfig
from supir_mlx.models.unet import GLVControl, LightGLVUNet
from supir_mlx.models.vae import AutoencoderKL
from supir_mlx.pipeline import tiled_vae
from supir_mlx.pipeline.tiled_vae import tiled_decode, tiled_encode, tiled_encode_with_denoise
from supir_mlx.sampling.denoiser import denoise
from supir_mlx.sampling.tiled import auto_tiling
from supir_mlx.weights.quantize import QuantSpec, materialize, quantize

GB = 1e9
# (image px, encoder tile px, decoder tile latent px): untiled (a tile >= the image) and the official VAEHook tiles
VAE_CASES = ((512, 512, 64), (1024, 1024, 128), (1024, 512, 64), (1536, 512, 64), (1024, 384, 32))
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@dataclass
class Cond:
    crossattn: mx.array
    vector: mx.array
    control: mx.array


class Denoiser(nn.Module):
    """Control encoder + UNet under their SUPIRModel paths, callable like models.supir.ControlledUNet."""

    def __init__(self, cfg: SUPIRConfig):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = LightGLVUNet(cfg.unet, cfg.project)
        self.model.control_model = GLVControl(cfg.unet)

    def __call__(self, x, t, cond, control_scale=1.0):
        control = self.model.control_model(cond.control, t, x, cond.crossattn, cond.vector)
        return self.model.diffusion_model(x, t, cond.crossattn, cond.vector, control, control_scale)


def build_denoiser(cfg: SUPIRConfig, dtype: mx.Dtype, spec: QuantSpec | None) -> Denoiser:
    m = Denoiser(cfg)
    m.set_dtype(dtype)
    if spec:
        quantize(m, spec)
    materialize(m)
    return m


def build_vae(cfg: SUPIRConfig, dtype: mx.Dtype) -> AutoencoderKL:
    vae = AutoencoderKL(cfg.vae)
    vae.set_dtype(dtype)
    materialize(vae)
    return vae


def measure(fn, *args, **kwargs):
    """(seconds, peak bytes above what was held before, result)."""
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    mx.eval(out)
    dt = time.perf_counter() - t
    return dt, mx.get_peak_memory() - base, out


def conditions(cfg: SUPIRConfig, control: mx.array, dtype: mx.Dtype) -> tuple[Cond, Cond]:
    ctx = mx.random.normal((1, 77, cfg.context_dim)).astype(dtype)
    vec = mx.random.normal((1, cfg.vector_dim)).astype(dtype)
    return Cond(ctx, vec, control), Cond(ctx * 0.5, vec * 0.5, control)


def reduced(cfg: SUPIRConfig, depth: tuple[int, ...] = (1, 1, 1)) -> SUPIRConfig:
    """Full widths and resolutions, shallower transformer stacks: the activation peak is that of one
    block (blocks run one after another), so it matches the full model at a quarter of its weights."""
    return replace(cfg, unet=replace(cfg.unet, transformer_depth=depth, transformer_depth_middle=depth[-1]))


def calibrate_unet(cfg: SUPIRConfig, dtype: mx.Dtype) -> None:
    """Activation peaks the planner's formulas are fitted to, and the least-squares fit itself."""
    rows = []
    den = build_denoiser(reduced(cfg), dtype, None)
    print(f"# reduced-depth denoiser, activations in {dtype}")
    for batch, s in ((1, 16), (2, 16), (1, 32), (2, 32), (1, 64), (2, 64), (1, 96), (1, 128), (2, 128)):
        x = mx.random.normal((batch, s, s, 4)).astype(dtype)
        c = Cond(mx.random.normal((batch, 77, cfg.context_dim)).astype(dtype),
                 mx.random.normal((batch, cfg.vector_dim)).astype(dtype), x)
        dt, peak, _ = measure(den, x, mx.full((batch,), 500, dtype=mx.int32), c)
        rows.append((batch, s, peak))
        print(f"unet batch={batch} latent={s}x{s} peak={peak} time={dt:.1f}s", flush=True)
    deeper = build_denoiser(reduced(cfg, (1, 2, 2)), dtype, None)
    x = mx.random.normal((2, 32, 32, 4)).astype(dtype)
    c = Cond(mx.random.normal((2, 77, cfg.context_dim)).astype(dtype), mx.random.normal((2, cfg.vector_dim)).astype(dtype), x)
    print(f"depth check (1,2,2) batch=2 latent=32x32 peak={measure(deeper, x, mx.full((2,), 500, dtype=mx.int32), c)[1]}")
    del den, deeper
    mx.clear_cache()
    a = np.array([[b * s * s, b * min(10 * (s * s / 4) ** 2, 2**26), b] for b, s, _ in rows], dtype=np.float64)
    peaks = np.array([p for *_, p in rows], dtype=np.float64)
    # Relative least squares: the planner needs every tile size about equally right, not the largest one exactly.
    coef = np.linalg.lstsq(a / peaks[:, None], np.ones_like(peaks), rcond=None)[0]
    print(f"fit (fp32): UNET_PER_PIXEL={coef[0]:.0f} UNET_PER_SCORE={coef[1]:.2f} UNET_PER_ITEM={coef[2]:.0f}")
    now = [memory.unet_activations(s, s, b, mx.float32) for b, s, _ in rows]
    for (b, s, p), fit, cur in zip(rows, a @ coef, now):
        print(f"  batch={b} latent={s}: measured {p / GB:.3f} GB, fit {fit / p - 1:+.1%}, memory.py now {cur / p - 1:+.1%}")


def calibrate_vae(cfg: SUPIRConfig, dtype: mx.Dtype) -> None:
    """MLX's peak of each VAE pass, untiled and tiled, against `tiled_vae.estimate_bytes`, and the COPIES value
    each measurement implies (the estimate's other terms, the held tile states, scores and output, kept)."""
    vae = build_vae(cfg, dtype)
    size = dtype.size
    print(f"# full-size VAE, {dtype}; COPIES now {tiled_vae.COPIES}")
    for px, enc_tile, dec_tile in VAE_CASES:
        img = mx.random.uniform(-1, 1, (1, px, px, 3)).astype(dtype)
        z = None
        for is_decoder, tile in ((False, enc_tile), (True, dec_tile)):
            if is_decoder:
                dt, peak, _ = measure(tiled_decode, vae, z, tile)
            else:
                dt, peak, z = measure(tiled_encode, vae, img, tile)
                z = z.astype(dtype)
            side = px // cfg.vae.downsample_factor if is_decoder else px
            tiled = tiled_vae.needs_tiling(side, side, tile, is_decoder)
            est = tiled_vae.estimate_bytes(cfg.vae, px, px, tile, is_decoder, size)
            unit = tiled_vae.copy_bytes(cfg.vae, px, px, tile, is_decoder, size)
            implied = tiled_vae.COPIES[tiled, is_decoder] + (peak - est) / unit
            print(f"vae_{'decode' if is_decoder else 'encode'} px={px} tile={tile if tiled else 'untiled'} "
                  f"peak={peak / GB:.3f} GB estimate={est / GB:.3f} GB ({est / peak - 1:+.1%}) "
                  f"implied COPIES[{tiled}, {is_decoder}]={implied:.2f} time={dt:.1f}s", flush=True)


STAGES = ("caption", "text", "vae", "diffusion")


def run_case(cfg: SUPIRConfig, in_px: int, out_px: int, steps: int, dtype: mx.Dtype, limit_gb: float | None,
             captioner: str, full_depth: bool, max_tiles: int | None, stages: tuple[str, ...],
             caption_layers: tuple[int, ...]) -> None:
    """Run the stages of the plan `memory.plan` makes for this output and limit, with its settings (VAE tiles and
    spilling, sampler tile, CFG batching, quantization, residency), and set the measured peaks beside its estimates.

    Measured peak of a stage = the weights resident in it (exact byte counts of the planned models, the same
    numbers the planner uses) + the activation peak measured here. Stage-1 is the denoise encoder then the decoder
    at the output size; the later `encode` and `decode` run the same network shapes with the same tiles, so they
    reuse those two measurements instead of running the two longest passes again."""
    plan = memory.plan(out_px, out_px, config=cfg, dtype=dtype, captioner=captioner, memory_limit_gb=limit_gb)
    print(f"\n## {in_px} -> {out_px} px, {steps} denoiser step(s), the planner's plan for {plan.budget / GB:.1f} GB:")
    print(plan)
    est = {s.name: s for s in plan.stages}
    vdt = mx.float32 if dtype == mx.float16 else dtype  # the VAE's dtype rule (weights.loading.component_dtypes)
    measured: dict[str, int] = {}
    print(f"\n{'stage':28s} {'time s':>8s} {'weights':>8s} {'activ.':>8s} {'peak GB':>8s} {'planned':>8s} {'error':>7s}")

    def row(name: str, seconds: float, act: int, note: str = "") -> None:
        s = est[name]
        measured[name] = s.weights + act
        print(f"{name:28s} {seconds:8.1f} {s.weights / GB:8.2f} {act / GB:8.2f} {(s.weights + act) / GB:8.2f} "
              f"{s.total / GB:8.2f} {s.total / (s.weights + act) - 1:+7.1%}{'  ' + note if note else ''}", flush=True)

    if "caption" in stages and plan.captioner:
        from bench_captioner import caption_stage  # bench/ is on sys.path when run as a script

        seconds, act = caption_stage(plan.captioner, dtype, caption_layers)
        row(f"caption (LLaVA {plan.captioner})", seconds, act, f"layers {caption_layers} measured, extrapolated")
    if "text" in stages:
        from supir_mlx.models.conditioner import Conditioner

        cond = Conditioner(cfg)
        cond.set_dtype(dtype)  # the planner counts the text encoders unquantized unless the spec covers them
        materialize(cond)
        caption = "a photo " * 60  # long enough to fill the 77 tokens
        dt, p, _ = measure(lambda: cond.prepare_condition([caption], "positive", "negative"))
        row("text encoders", dt, p)
        del cond
        mx.clear_cache()
    if "vae" in stages:
        tiles = plan.vae_tiles
        vae_budget = max(plan.budget - est["encode"].weights, 1)  # what the plan left the tiled VAE
        vae = build_vae(cfg, vdt)
        img = mx.random.uniform(-1, 1, (1, out_px, out_px, 3)).astype(vdt)  # the LQ image at the output size
        dte, pe, z1 = measure(tiled_encode_with_denoise, vae, img, tiles.encoder_tile, budget_bytes=vae_budget)
        dtd, pd, _ = measure(tiled_decode, vae, z1, tiles.decoder_tile, budget_bytes=vae_budget)
        spill = f"encoder tile {tiles.encoder_tile} px{' spilled' if tiles.encoder_spill else ''}, decoder tile " \
                f"{tiles.decoder_tile} latent px{' spilled' if tiles.decoder_spill else ''}"
        row("stage-1 (denoise enc + dec)", dte + dtd, max(pe, pd), spill)
        row("encode", dte, pe, "= stage-1's encoder pass (same shapes and tiles)")
        row("decode", dtd, pd, "= stage-1's decoder pass (same shapes and tiles)")
        del vae, img, z1
        mx.clear_cache()
    if "diffusion" in stages:
        depth_cfg = cfg if full_depth else reduced(cfg)
        den = build_denoiser(depth_cfg, dtype, None)
        batched, lat = plan.cfg_batched, out_px // 8
        tiling = auto_tiling(lat, lat, plan.unet_tile)
        windows = tiling.windows(lat, lat) if tiling else [(0, lat, 0, lat)]
        z = mx.random.normal((1, lat, lat, 4)).astype(dtype)
        cond, uncond = conditions(cfg, z, dtype)
        x = mx.random.normal(z.shape).astype(dtype)
        mx.eval(z, x, cond.crossattn, cond.vector)
        total, peak = 0.0, 0
        ran = windows[: max_tiles or len(windows)]
        def tile_call(h0: int, h1: int, w0: int, w1: int) -> mx.array:
            def crop(c: Cond) -> Cond:
                return Cond(c.crossattn, c.vector, c.control[:, h0:h1, w0:w1])

            return denoise(den, x[:, h0:h1, w0:w1], 5.0, crop(cond), crop(uncond), 1.0, batched=batched)

        for _ in range(steps):
            for window in ran:
                dt, p, _ = measure(tile_call, *window)
                total, peak = total + dt, max(peak, p)
        total *= len(windows) / len(ran)
        note = ""
        if plan.quant and plan.quant.convs:
            # Quantized 3x3 convs are dequantized just in time; the lazy graph may dequantize a few ahead. MLX's
            # CPU quantized kernels are too slow for a full tile, so that extra is measured on a small latent:
            # the same reduced-depth denoiser quantized as planned minus unquantized (the feature maps cancel).
            small = mx.random.normal((1, 16, 16, 4)).astype(dtype)
            sc = Cond(cond.crossattn, cond.vector, small)
            def call(m: Denoiser) -> tuple[float, int, mx.array]:
                return measure(lambda: denoise(m, small, 5.0, sc, sc, 1.0, batched=False))

            _, plain, _ = call(den)
            del den
            mx.clear_cache()
            qden = build_denoiser(depth_cfg, dtype, plan.quant)
            _, quantized, _ = call(qden)
            del qden
            extra = max(quantized - plain, 0)
            peak += extra
            note = f"incl. {extra / GB:.2f} GB of just-in-time dequantized convs ({plan.quant.bits}-bit)"
        mx.clear_cache()
        row("diffusion", total, peak, note)
        print(f"{'  per step':28s} {total / steps:8.1f}   ({len(windows)} tile(s) of {windows[0][1] - windows[0][0]}x"
              f"{windows[0][3] - windows[0][2]} latent, CFG {'batch 2' if batched else 'sequential'}"
              f"{'' if len(ran) == len(windows) else f'; timed {len(ran)}, scaled'}"
              f"{'' if full_depth else '; reduced depth: activations of 1/1/1-deep transformers, not its time'})")
    if len(measured) == len(est):
        top = max(measured, key=measured.get)
        print(f"measured peak {measured[top] / GB:.2f} GB ({top}); planner {plan.peak / GB:.2f} GB "
              f"({plan.peak / measured[top] - 1:+.1%})")


TORCH_STEP = """
import sys, time, torch
from diffusers import UNet2DConditionModel
torch.manual_seed(0)
cfg = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
           block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
           "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
           transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
           use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
           projection_class_embeddings_input_dim=2816)
unet = UNet2DConditionModel(**cfg).eval()
s = int(sys.argv[1])
x = torch.randn(2, 4, s, s); ctx = torch.randn(2, 77, 2048)
added = dict(text_embeds=torch.randn(2, 1280), time_ids=torch.randn(2, 6))
with torch.no_grad():
    t = time.perf_counter(); unet(x, 500, ctx, added_cond_kwargs=added); print(f"{time.perf_counter() - t:.2f}")
"""


def torch_ratio(python: str, cfg: SUPIRConfig, latent: int) -> None:
    """One SDXL UNet call (batch 2) in diffusers vs ours (fp32 both, no control encoder) on this machine."""
    try:
        r = subprocess.run([python, "-c", TORCH_STEP, str(latent)], capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"torch comparison skipped: {e}")
        return
    if r.returncode:
        print(f"torch comparison skipped: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        return
    unet = LightGLVUNet(cfg.unet, cfg.project)
    materialize(unet)
    ctrl = [mx.zeros((2, latent // d, latent // d, c)) for d, c in
            ([(1, 320)] * 3 + [(2, 320), (2, 640), (2, 640), (4, 640), (4, 1280), (4, 1280), (4, 1280)])]
    x, ctx, y = mx.random.normal((2, latent, latent, 4)), mx.random.normal((2, 77, 2048)), mx.random.normal((2, 2816))
    t = mx.full((2,), 500, dtype=mx.int32)
    dt, _, _ = measure(unet, x, t, ctx, y, ctrl)
    print(f"SDXL UNet call, batch 2, {latent}x{latent} latent, fp32: diffusers {float(r.stdout.split()[-1]):.1f} s, "
          f"supir-mlx {dt:.1f} s (UNet with SUPIR connectors)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", help="IN:OUT pixels, e.g. 512:1024 (repeatable)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dtype", choices=DTYPES, default="float32")
    ap.add_argument("--full-depth", action="store_true",
                    help="the real 10-deep transformers (default: 1-deep, same activation peak, 1/4 of the weights)")
    ap.add_argument("--captioner", choices=("auto", "13b", "7b", "none"), default="auto",
                    help="what the planner may choose (auto: 13B if it fits, else 7B)")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                    help="measure only these (e.g. in separate processes: the peaks are per process)")
    ap.add_argument("--caption-layers", type=int, nargs="+", default=[2, 3],
                    help="decoder layers of the measured LLaVA models (extrapolated to the real depth)")
    ap.add_argument("--max-tiles", type=int, help="run only this many sampler tiles per step (all tiles are alike: "
                    "the peak is the same, the step time is scaled up)")
    ap.add_argument("--memory-limit", type=float, help="GB the planner (and so the VAE tiles) may use")
    ap.add_argument("--calibrate", choices=("unet", "vae", "all"), help="measure the planner's activation constants")
    ap.add_argument("--torch", metavar="PYTHON", help="a Python with torch + diffusers (separate venv)")
    ap.add_argument("--torch-latent", type=int, default=64)
    a = ap.parse_args()
    print(f"# machine: {platform.machine()} {platform.system()} {platform.processor() or ''}, "
          f"mlx {mx.__version__}, device {mx.default_device()}")
    cfg = SUPIRConfig.sdxl_v0()
    dtype = DTYPES[a.dtype]
    if a.calibrate in ("unet", "all"):
        calibrate_unet(cfg, dtype)
    if a.calibrate in ("vae", "all"):
        calibrate_vae(cfg, dtype)
    for case in a.case or []:
        i, o = (int(v) for v in case.split(":"))
        run_case(cfg, i, o, a.steps, dtype, a.memory_limit, None if a.captioner == "none" else a.captioner,
                 a.full_depth, a.max_tiles, tuple(a.stages), tuple(a.caption_layers))
        mx.clear_cache()
    if a.torch:
        torch_ratio(a.torch, cfg, a.torch_latent)


if __name__ == "__main__":
    main()
