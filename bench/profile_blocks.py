"""Where the time of one denoiser call, one VAE pass or one text-encoder call goes, by block type (full-size
networks, random weights).

    python bench/profile_blocks.py --part denoiser --size 64        # control + UNet, CFG batch 2, 64x64 latent
    python bench/profile_blocks.py --part decode --size 512          # VAE decoder, 512 px output
    python bench/profile_blocks.py --part encode --size 512          # SUPIR's denoise encoder, 512 px input
    python bench/profile_blocks.py --part text                       # CLIP ViT-L + OpenCLIP bigG, 2 x 77 tokens
    python bench/profile_blocks.py --part denoiser --official ~/src/SUPIR --torch-python /tmp/torchvenv/bin/python

With --official (or $SUPIR_OFFICIAL; see compare_official.py for the venv) the official PyTorch code is profiled
the same way, first, in its own process (`official_worker.py --profile`: the same block types wrapped around its
modules' forward), and the two columns are printed side by side (CPU only: CUDA ops are asynchronous).

Each profiled block (convolutions, normalisation, attention, feed-forward, up-sampling) evaluates its inputs
before it starts and its output before it returns, so its wall time is its own; a block's time excludes the
profiled blocks inside it. "other" is the rest of the profiled call (embeddings, residual adds, concatenations,
un-profiled linear layers). The forced evaluations cost a little fusion and overlap, so the profiled call is
slightly slower than a plain one; both are printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
from block_times import BlockTimes
from compare_official import mlx_case, official_env, run_side

from supir_mlx.models import adapters, clip, layers, unet, vae
from supir_mlx.weights.quantize import QuantizedConv2d

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class Profiler(BlockTimes):
    def __init__(self) -> None:
        super().__init__(before=lambda args: mx.eval([a for a in args if isinstance(a, mx.array)]), after=mx.eval)

    def install(self) -> None:
        """Wrap the block types of every network (class attributes, so every instance is profiled)."""
        for cls, category in (
            (layers.Conv2d, "convolution"),
            (QuantizedConv2d, "convolution"),
            (layers.GroupNorm, "normalisation (GroupNorm)"),
            (layers.LayerNorm, "normalisation (LayerNorm)"),
            (adapters.CrossAttention, "attention (incl. q/k/v/out projections)"),
            (unet.FeedForward, "feed-forward (GEGLU)"),
            (layers.Upsample, "up-sampling (nearest x2)"),
            (clip.CLIPAttention, "attention (incl. q/k/v/out projections)"),
            (clip.OpenCLIPAttention, "attention (incl. q/k/v/out projections)"),
            (clip.CLIPMLP, "feed-forward (MLP)"),
            (clip.OpenCLIPMLP, "feed-forward (MLP)"),
        ):
            cls.__call__ = self.wrap(category, cls.__call__)
        vae.AttnBlock.attend = self.wrap("attention (incl. q/k/v/out projections)", vae.AttnBlock.attend)

    def report(self, total: float, plain: float, official: dict | None = None) -> None:
        """This side's table; with the official side's profile, its seconds and our time over its time per row."""
        theirs = official["seconds"] if official else {}
        head = f"{'block type':44s} {'calls':>6s} {'time':>10s} {'share':>6s}"
        print(head + (f" {'official':>10s} {'ratio':>6s}" if official else ""))

        def row(name: str, calls: str, sec: float, other: float | None) -> None:
            line = f"{name:44s} {calls:>6s} {sec:9.3f}s {100 * sec / total:5.1f}%"
            if official:
                line += f" {other:9.3f}s {sec / other:5.2f}x" if other else f" {'-':>10s} {'':>6s}"
            print(line)

        for category, sec in sorted(self.seconds.items(), key=lambda kv: -kv[1]):
            row(category, str(self.calls[category]), sec, theirs.get(category))
        for category in sorted(set(theirs) - set(self.seconds)):  # a block type only the official side has
            row(category, "0", 0.0, theirs[category])
        other = total - sum(self.seconds.values())
        row("other", "", other, official["total"] - sum(theirs.values()) if official else None)
        row("profiled call", "", total, official["total"] if official else None)
        print(f"{'plain call (no profiling)':44s} {'':6s} {plain:9.3f}s" + (
            f" {official['median']:9.3f}s {plain / official['median']:5.2f}x" if official else ""))


def official_profile(args: argparse.Namespace) -> dict:
    """The official side's plain-call time ("median") and block profile ("total", "seconds"), from its worker."""
    worker = Path(__file__).resolve().parent / "official_worker.py"
    cmd = [args.torch_python, str(worker), "--official", args.official, "--case", args.part, "--size", str(args.size),
           "--dtype", args.dtype, "--runs", "1", "--warmup", "1", "--profile"]
    result = run_side(cmd, official_env(), timeout=3600)
    if "error" in result:
        sys.exit(f"error: the official side failed: {result['error']}")
    return {"median": result["median"], **result["profile"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("denoiser", "decode", "encode", "text"), default="denoiser")
    ap.add_argument("--size", type=int, default=64, help="latent side (denoiser) or image side in px (VAE)")
    ap.add_argument("--dtype", choices=DTYPES, default="float16" if mx.metal.is_available() else "float32")
    ap.add_argument("--official", default=os.environ.get("SUPIR_OFFICIAL"), help="official SUPIR work tree")
    ap.add_argument("--torch-python", default=os.environ.get("SUPIR_TORCH_PYTHON"), help="the official side's python")
    args = ap.parse_args()
    if args.official and not args.torch_python:
        ap.error("--official needs --torch-python (or $SUPIR_TORCH_PYTHON)")
    official = official_profile(args) if args.official else None  # first: the two sides never share the cores
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
    what = "text encoders, 2 x 77 tokens" if args.part == "text" else f"{args.part} {args.size}"
    print(f"{what}, {args.dtype}, device {mx.default_device()}")
    profiler.report(total, plain, official)


if __name__ == "__main__":
    main()
