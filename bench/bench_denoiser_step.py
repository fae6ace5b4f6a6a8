"""Time one denoiser network call: full-size control encoder + SDXL UNet (SUPIR v0), CFG batch 2 (or 1).

Random weights (nothing is downloaded). Inputs as in sampling, B = --batch (2: both CFG branches at once):
latent [B, S, S, 4] (S = image side / 8: 64 for 512 px, 128 for 1024 px), an LQ control latent of the same
shape, context [B, 77, 2048], vector [B, 2816], DDPM timestep index 500. Each call prints its time, MLX's peak
and that peak above the weights and inputs (what memory.unet_activations estimates).

    python bench/bench_denoiser_step.py [--latent 64] [--batch 2] [--dtype float16] [--warmup 1] [--runs 1]
                                        [--part both|control|unet] [--quantize 8|4]

Defaults: float16 with one warm-up call on Metal; float32 without warm-up elsewhere (a CPU call takes
minutes and has nothing to warm up). For reference, the official PyTorch code (fp32, 2-core x86 CPU)
takes 16.7 s and 16.2 GB for the 64x64 call, which costs 4.76 TFLOP.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
from mlx.utils import tree_flatten

from supir_mlx.config import SUPIRConfig
from supir_mlx.models.supir import Condition, ControlledUNet
from supir_mlx.models.unet import Downsample, GLVControl, LightGLVUNet
from supir_mlx.weights.quantize import QuantSpec, quantize

GB = 1e9
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def control_shapes(unet: LightGLVUNet, s: int, b: int) -> list[tuple[int, ...]]:
    """Shapes of the 10 control features for batch `b` and latent side `s` (input-block outputs, then the middle)."""
    shapes = []
    for block, ch in zip(unet.input_blocks, unet.skip_channels):
        s //= 2 if isinstance(block[0], Downsample) else 1
        shapes.append((b, s, s, ch))
    return shapes + [shapes[-1]]


def main() -> None:
    metal = mx.metal.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latent", type=int, default=64, help="latent side (image side / 8)")
    p.add_argument("--batch", type=int, default=2, help="2: CFG batched; 1: one CFG branch (sequential CFG)")
    p.add_argument("--dtype", choices=DTYPES, default="float16" if metal else "float32")
    p.add_argument("--warmup", type=int, default=1 if metal else 0)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument(
        "--part",
        choices=("both", "control", "unet"),
        default="both",
        help="time one network alone (random control features for the UNet) where both do not fit in memory",
    )
    p.add_argument("--quantize", type=int, choices=(4, 8), help="weights quantized as restore's plans do "
                   "(Linear and 3x3 conv weights, group size 64); compute stays in --dtype")
    args = p.parse_args()
    dtype = DTYPES[args.dtype]
    cfg = SUPIRConfig.sdxl_v0()

    start = time.perf_counter()
    if args.part == "both":
        model = ControlledUNet(cfg)
    elif args.part == "control":
        model = GLVControl(cfg.unet)
    else:
        model = LightGLVUNet(cfg.unet, cfg.project)
    model.set_dtype(dtype)  # before the lazy random init is evaluated: no float32 copy ever exists
    if args.quantize:
        quantize(model, QuantSpec(bits=args.quantize, scope=("",)))
    mx.eval(model.parameters())
    n = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(
        f"device {'metal' if metal else 'cpu'}  dtype {args.dtype}  quantized {args.quantize or 'no'}  latent {args.latent}x{args.latent}  batch {args.batch}"
        f"  network {args.part}\n"
        f"build    {time.perf_counter() - start:7.1f} s  peak {mx.get_peak_memory() / GB:6.2f} GB"
        f"  ({n / 1e9:.3f} G parameters, {mx.get_active_memory() / GB:.2f} GB)"
    )

    s, b = args.latent, args.batch
    k = mx.random.split(mx.random.key(0), 5)
    x = mx.random.normal((b, s, s, 4), key=k[0]).astype(dtype)
    cond = Condition(
        crossattn=mx.random.normal((b, 77, 2048), key=k[1]).astype(dtype),
        vector=mx.random.normal((b, 2816), key=k[2]).astype(dtype),
        control=mx.random.normal((b, s, s, 4), key=k[3]).astype(dtype),
    )
    t = mx.array([500] * b)
    features = []
    if args.part == "unet":
        keys = mx.random.split(k[4], 10)
        features = [mx.random.normal(sh, key=kk).astype(dtype) for sh, kk in zip(control_shapes(model, s, b), keys)]
    mx.eval(x, cond.crossattn, cond.vector, cond.control, features)
    weights = mx.get_active_memory()

    def call() -> mx.array | list[mx.array]:
        if args.part == "unet":
            return model(x, t, cond.crossattn, cond.vector, features, 1.0)
        if args.part == "control":
            return model(cond.control, t, x, cond.crossattn, cond.vector)
        return model(x, t, cond, 1.0)

    for i in range(args.warmup + args.runs):
        mx.reset_peak_memory()
        start = time.perf_counter()
        mx.eval(call())
        label = "warm-up" if i < args.warmup else "call"
        print(f"{label:8s} {time.perf_counter() - start:7.1f} s  peak {mx.get_peak_memory() / GB:6.2f} GB"
              f"  ({(mx.get_peak_memory() - weights) / GB:.3f} GB above the weights and inputs)")


if __name__ == "__main__":
    main()
