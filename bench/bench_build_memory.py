"""Peak memory of building the full-size model, converting official checkpoints, and loading a converted folder.

Stages (each in its own process, so the OS peak RSS of one does not hide another's):
  build    construct UNet + control encoder lazily, then materialise their random init in float16
  source   write a random-weight official-layout checkpoint (float16 safetensors, streamed) to DIR
  convert  `convert` that file to an MLX folder in DIR
  load     `load_converted` that folder

    python bench/bench_build_memory.py [--dir /tmp/supir-bench] [--stages build source convert load] [--keep]

MLX peak is the allocator's (mx.get_peak_memory); RSS peak includes memory-mapped checkpoint pages,
which the OS can drop at any time. Needs about 20 GB of disk in DIR and 11 GB of RAM for `load`.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from supir_mlx.config import SUPIRConfig
from supir_mlx.models.supir import SUPIRModel

GB = 1e9


def report(stage: str, seconds: float, **extra: str) -> None:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    fields = "  ".join(f"{k} {v}" for k, v in extra.items())
    print(f"{stage:8s} {seconds:7.1f} s  MLX peak {mx.get_peak_memory() / GB:6.2f} GB  RSS peak {rss / GB:6.2f} GB  {fields}")


def stage_build(_: Path) -> None:
    start = time.perf_counter()
    model = SUPIRModel(SUPIRConfig.sdxl_v0()).model  # ControlledUNet: diffusion_model + control_model
    lazy_peak = mx.get_peak_memory()
    names = [name for name, _ in tree_flatten(model.parameters())]
    n = sum(p.size for _, p in tree_flatten(model.parameters()))
    for name in names:
        # Swap in the float16 array before evaluating it: an evaluated array the model still
        # referenced (the float32 init) would be kept, 15 GB in all.
        value = dict(tree_flatten(model.parameters()))[name].astype(mx.float16)
        model.update(tree_unflatten([(name, value)]))
        mx.eval(value)
    report("build", time.perf_counter() - start, params=f"{n / 1e9:.3f} G", lazy_construction=f"{lazy_peak / 1e6:.3f} MB")


def source_path(d: Path) -> Path:
    return d / "random_official.safetensors"


def stage_source(d: Path) -> None:
    """Every tensor of the official model (sdxl + SUPIR keys), random float16, written without holding it."""
    start = time.perf_counter()
    model = SUPIRModel(SUPIRConfig.sdxl_v0())
    header, offset = {}, 0
    for name, p in tree_flatten(model.parameters()):
        shape = list(p.shape)
        if len(shape) == 4:  # back to the official [out, in, kh, kw]
            shape = [shape[0], shape[3], shape[1], shape[2]]
        nbytes = 2 * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    block = (np.random.default_rng(0).standard_normal(1 << 25) * 0.02).astype("<f2").tobytes()
    with open(source_path(d), "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        left = offset
        while left:  # the same random block, repeated: values do not matter for memory or speed
            f.write(block[: min(left, len(block))])
            left -= min(left, len(block))
    report("source", time.perf_counter() - start, file=f"{offset / GB:.2f} GB")


def stage_convert(d: Path) -> None:
    from supir_mlx.weights.convert import convert

    shutil.rmtree(d / "converted", ignore_errors=True)
    start = time.perf_counter()
    convert([source_path(d)], d / "converted", dtype="float16")
    size = sum(f.stat().st_size for f in (d / "converted").iterdir())
    report("convert", time.perf_counter() - start, folder=f"{size / GB:.2f} GB")


def stage_load(d: Path) -> None:
    from supir_mlx.weights.convert import load_converted

    start = time.perf_counter()
    model = load_converted(d / "converted")
    n = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    report("load", time.perf_counter() - start, weights=f"{n / GB:.2f} GB")


STAGES = {"build": stage_build, "source": stage_source, "convert": stage_convert, "load": stage_load}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/supir-bench"))
    ap.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    ap.add_argument("--keep", action="store_true", help="keep the files in DIR afterwards")
    ap.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)  # one stage, in a child process
    args = ap.parse_args()
    if args.stage:
        STAGES[args.stage](args.dir)
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    print(f"device {mx.default_device()}  dir {args.dir}")
    try:
        for stage in args.stages:
            subprocess.run([sys.executable, __file__, "--dir", str(args.dir), "--stage", stage], check=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
