"""Where the time of one denoiser call or one VAE pass goes, by block type (full-size networks, random weights).

    python bench/profile_blocks.py --part denoiser --size 64        # control + UNet, CFG batch 2, 64x64 latent
    python bench/profile_blocks.py --part decode --size 512          # VAE decoder, 512 px output
    python bench/profile_blocks.py --part encode --size 512          # SUPIR's denoise encoder, 512 px input

Each profiled block (convolutions, normalisation, attention, feed-forward, up-sampling) evaluates its inputs
before it starts and its output before it returns, so its wall time is its own; a block's time excludes the
profiled blocks inside it. "other" is the rest of the profiled call (embeddings, residual adds, concatenations,
un-profiled linear layers). The forced evaluations cost a little fusion and overlap, so the profiled call is
slightly slower than a plain one; both are printed.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter, defaultdict

import mlx.core as mx
from compare_official import mlx_case

from supir_mlx.models import adapters, layers, unet, vae
from supir_mlx.weights.quantize import QuantizedConv2d

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class Profiler:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self.stack: list[float] = []  # time spent in profiled blocks nested in each open block

    def wrap(self, category: str, fn):
        def timed(*args, **kwargs):
            mx.eval([a for a in (*args, *kwargs.values()) if isinstance(a, mx.array)])
            self.stack.append(0.0)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            mx.eval(out)
            elapsed = time.perf_counter() - start
            self.seconds[category] += elapsed - self.stack.pop()
            self.calls[category] += 1
            if self.stack:
                self.stack[-1] += elapsed
            return out

        return timed

    def install(self) -> None:
        """Wrap the block types of every network (class attributes, so every instance is profiled)."""
        for cls, category in (
            (layers.Conv2d, "convolution"),
            (QuantizedConv2d, "convolution"),
            (layers.GroupNorm, "normalisation (GroupNorm)"),
            (unet.nn.LayerNorm, "normalisation (LayerNorm)"),
            (adapters.CrossAttention, "attention (incl. q/k/v/out projections)"),
            (unet.FeedForward, "feed-forward (GEGLU)"),
            (layers.Upsample, "up-sampling (nearest x2)"),
        ):
            cls.__call__ = self.wrap(category, cls.__call__)
        vae.AttnBlock.attend = self.wrap("attention (incl. q/k/v/out projections)", vae.AttnBlock.attend)

    def report(self, total: float, plain: float) -> None:
        print(f"{'block type':44s} {'calls':>6s} {'time':>10s} {'share':>6s}")
        rows = sorted(self.seconds.items(), key=lambda kv: -kv[1])
        for category, sec in rows:
            print(f"{category:44s} {self.calls[category]:6d} {sec:9.3f}s {100 * sec / total:5.1f}%")
        other = total - sum(self.seconds.values())
        print(f"{'other':44s} {'':6s} {other:9.3f}s {100 * other / total:5.1f}%")
        print(f"{'profiled call':44s} {'':6s} {total:9.3f}s\n{'plain call (no profiling)':44s} {'':6s} {plain:9.3f}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("denoiser", "decode", "encode"), default="denoiser")
    ap.add_argument("--size", type=int, default=64, help="latent side (denoiser) or image side in px (VAE)")
    ap.add_argument("--dtype", choices=DTYPES, default="float16" if mx.metal.is_available() else "float32")
    args = ap.parse_args()
    call = mlx_case(args.part, args.size, 0, DTYPES[args.dtype])
    mx.eval(call())  # warm-up: compiled kernels, allocator
    start = time.perf_counter()
    mx.eval(call())
    plain = time.perf_counter() - start
    profiler = Profiler()
    profiler.install()
    start = time.perf_counter()
    mx.eval(call())
    total = time.perf_counter() - start
    print(f"{args.part} {args.size}, {args.dtype}, device {mx.default_device()}")
    profiler.report(total, plain)


if __name__ == "__main__":
    main()
