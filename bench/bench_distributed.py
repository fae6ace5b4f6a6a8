"""Work over 2 ranks (mlx.launch --backend ring on 127.0.0.1) against 1 process, and the bytes exchanged per step.

    python bench/bench_distributed.py                         # tiny model: one large image, then a batch
    python bench/bench_distributed.py --size 512 --tile 32 --steps 4 --batch 4

Runs `supir-mlx restore --json` on the tiny reference model (tests/reference/tiny), once as one process and once
under `mlx.launch -n 2`, and reads the times from the events: the whole command, each restore (result.seconds) and
the sampling (the last step event's elapsed). One large image has its sampling tiles divided between the ranks
(stage 1, conditioning and decoding run on both); a batch gives each rank half of the images. Then the per-step
exchange of the tiled sampler (`_Blender.exchanged_bytes`): for this run and for a 2048 px restore with the official
128-latent-pixel tiles at stride 64, from which the time on N Macs can be predicted as
compute / N + exchanged bytes x 2 (N - 1) / N / link bandwidth per step.
Random weights: the numbers are about time, not images. On a 2-core machine two ranks share the cores.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from supir_mlx.sampling.tiled import Tiling, _Blender

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "reference" / "tiny"
SUPIR = str(Path(sys.executable).parent / "supir-mlx")
LAUNCH = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]


def free_port() -> int:
    while True:
        p = random.randint(20000, 60000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue


def run(ranks: int, args: list[str]) -> tuple[float, list[dict]]:
    cmd = [SUPIR, "restore", *args, "--json", "-q"]
    if ranks > 1:
        cmd = [*LAUNCH, "-n", str(ranks), "--backend", "ring", "-p", str(free_port()), *cmd]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    events = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    if not any(e["event"] == "summary" for e in events):
        sys.exit(f"run failed:\n{p.stderr[-2000:]}")
    return wall, events


def report(label: str, ranks: int, wall: float, events: list[dict]) -> None:
    results = [e for e in events if e["event"] == "result"]
    last_steps = {}
    for e in events:
        if e["event"] == "step":
            last_steps[(e.get("rank", 0), e["index"])] = e["elapsed"]
    sampling = max(last_steps.values()) if last_steps else 0.0
    print(f"  {label:22s} {ranks} rank{'s' if ranks > 1 else ' '}  command {wall:7.1f} s   restores "
          f"{sum(e['seconds'] for e in results):7.1f} s (sum)   sampling {sampling:6.1f} s (longest)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="working size of the large image (pixels)")
    ap.add_argument("--tile", type=int, default=32, help="sampler tile in latent pixels (stride: half)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4, help="images in the batch case (0: skip it)")
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    weights = work / "tiny"
    subprocess.run([SUPIR, "convert", str(TINY / "supir_tiny.safetensors"), "--config", str(TINY / "config.json"),
                    "--dtype", "float32", "-o", str(weights)], check=True, capture_output=True)
    rng = np.random.default_rng(0)
    (work / "large").mkdir()
    Image.fromarray(rng.integers(0, 256, (a.size // 4, a.size // 4, 3), dtype=np.uint8)).save(work / "large" / "p.png")
    common = ["--weights", str(weights), "--prompt", "x", "--steps", str(a.steps)]

    print(f"mlx {mx.__version__}, {mx.default_device()}; tiny model; ranks on 127.0.0.1 (ring backend)")
    print(f"one image: {a.size} px working size, {a.steps} steps, sampler tiles {a.tile} at stride {a.tile // 2}")
    for ranks in (1, 2):
        out = work / f"large_out_{ranks}"
        wall, events = run(ranks, [str(work / "large"), "-o", str(out), "--min-size", str(a.size), "--upscale", "4",
                                   "--tile-size", str(a.tile), "--tile-stride", str(a.tile // 2), *common])
        report("one image, tiles split", ranks, wall, events)
    same = np.array_equal(np.asarray(Image.open(work / "large_out_1" / "p_supir.png")),
                          np.asarray(Image.open(work / "large_out_2" / "p_supir.png")))
    print(f"  2-rank output equals the 1-process output: {same}")

    if a.batch:
        (work / "batch").mkdir()
        for i in range(a.batch):
            Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(work / "batch" / f"b{i}.png")
        print(f"batch: {a.batch} images, 256 px working size, {a.steps} steps")
        for ranks in (1, 2):
            wall, events = run(ranks, [str(work / "batch"), "-o", str(work / f"batch_out_{ranks}"), "--min-size", "256",
                                       *common])
            report("batch, images split", ranks, wall, events)

    print("bytes each rank's all_sum reduces per sampling step (float32 latent, 4 channels):")
    lat = a.size // 8
    cases = [(f"this run ({a.size} px)", (1, lat, lat, 4), Tiling(a.tile, a.tile // 2)),
             ("2048 px restore", (1, 256, 256, 4), Tiling(128, 64))]
    for label, shape, tiling in cases:
        b = _Blender(tiling, shape, mx.float32)
        x_only, with_x0 = b.exchanged_bytes(1), b.exchanged_bytes(2)
        print(f"  {label:22s} {len(b.windows)} tiles of {tiling.size}x{tiling.size}: {x_only / 1e6:.2f} MB "
              f"(EDM), {with_x0 / 1e6:.2f} MB (DPM++, or EDM with a step-event callback: x0 blended too); "
              f"a ring all-reduce sends and receives 2(N-1)/N of that per rank")


if __name__ == "__main__":
    main()
