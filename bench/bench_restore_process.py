"""End-to-end truth: the real `supir-mlx restore` process on full-size random checkpoints, against its plan.

Writes an SDXL base checkpoint and a pruned SUPIR checkpoint in the official key layouts, full size, fp16, with
random weights, from the reference manifests (../shared/reference/manifests or tests/reference/manifests); then
runs the command a user runs

    supir-mlx restore photo.png --upscale 2 --sdxl SDXL --supir SUPIR --offline --captioner none --steps 1 \
        --memory-limit GB

twice in fresh processes: once with an empty weight cache (it converts, and quantizes when the plan says so), once
from the cache. For each it reports the process's peak resident memory (VmHWM: everything the process holds,
MLX's cache of freed buffers and mapped weight files included), the resident memory sampled through each stage, and
the per-stage times the command prints, next to what `--plan` prints for the same command.

    python bench/bench_restore_process.py --work /tmp/e2e --memory-limit 8            # 512 -> 1024, 1 step
    python bench/bench_restore_process.py --work /tmp/e2e --size 256 --upscale 2      # a quicker case

The checkpoints (about 9.6 GB) are written once into --work and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9


def manifests_dir() -> Path:
    for d in (ROOT.parent / "shared" / "reference" / "manifests", ROOT / "tests" / "reference" / "manifests"):
        if d.is_dir():
            return d
    raise SystemExit("no reference manifests found (../shared/reference/manifests or tests/reference/manifests)")


def official_sources(root: Path) -> tuple[dict, dict]:
    """(SDXL base checkpoint, pruned SUPIR checkpoint) as {key: shape}, in the official layouts."""
    load = lambda name: json.loads((root / f"{name}.json").read_text())  # noqa: E731
    sdxl_m, full, expected = load("sdxl_base_sgm"), load("supir_model_full"), load("supir_ckpt_expected")
    sdxl = {**sdxl_m["tensors"], **sdxl_m["keys_probably_in_sdxl_ckpt_not_in_official_model"]["tensors"]}
    prefixes = tuple(expected["expected_prefixes"]["from_SUPIR_ckpt_required"])
    supir = {k: v for k, v in full["tensors"].items() if k.startswith(prefixes)}
    return sdxl, supir


def write_random_safetensors(path: Path, shapes: dict, seed: int) -> None:
    """A float16 safetensors file with these keys, streamed tensor by tensor (never all in memory).

    Weights are drawn like a trained network's scale (normal / sqrt(fan-in)), norm scales are 1 and biases 0,
    so activations stay finite through the full depth as they do with real weights."""
    if path.exists():
        return
    rng = np.random.default_rng(seed)
    header, offset = {}, 0
    for key, shape in shapes.items():
        n = int(np.prod(shape)) if shape else 1
        header[key] = {"dtype": "I64" if key.endswith("position_ids") else "F16", "shape": list(shape),
                       "data_offsets": [offset, offset + n * (8 if key.endswith("position_ids") else 2)]}
        offset = header[key]["data_offsets"][1]
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for key, shape in shapes.items():
            if key.endswith("position_ids"):
                f.write(np.arange(int(np.prod(shape)), dtype=np.int64).tobytes())
                continue
            if len(shape) >= 2:
                fan_in = int(np.prod(shape[1:]))
                w = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)
            elif key.endswith("weight"):  # 1-D weights are norm scales
                w = np.ones(shape, np.float32)
            elif shape:
                w = np.zeros(shape, np.float32)
            else:
                w = np.full((), 4.6052, np.float32)  # logit_scale
            f.write(w.astype(np.float16).tobytes())
    os.replace(tmp, path)


def test_photo(path: Path, size: int) -> None:
    """A smooth, photo-like test image (gradients + blobs + mild noise)."""
    from PIL import Image

    if path.exists():
        return
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([0.5 + 0.4 * np.sin(6 * x + 2 * y), 0.5 + 0.4 * np.cos(5 * y), 0.4 + 0.3 * x * y], -1)
    rgb += np.random.default_rng(0).normal(0, 0.04, rgb.shape)
    Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8)).save(path)


class Sampler(threading.Thread):
    """Polls a process's /proc status: resident memory over time (anonymous and file-backed)."""

    def __init__(self, pid: int, period: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.period, self.samples, self.done = pid, period, [], False

    def run(self) -> None:
        t0 = time.perf_counter()
        while not self.done:
            try:
                fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.pid}/status").read_text().splitlines())
            except (OSError, ValueError):
                break
            kb = lambda k: int(fields.get(k, "0 kB").split()[0]) * 1024  # noqa: E731
            self.samples.append((time.perf_counter() - t0, kb("VmRSS"), kb("RssAnon"), kb("RssFile"), kb("VmHWM")))
            time.sleep(self.period)


def run_restore(cmd: list[str], env: dict) -> dict:
    """Run one command; its output lines with their times, resident-memory samples and peak (ru_maxrss)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    sampler = Sampler(proc.pid)
    sampler.start()
    lines = []
    for line in proc.stdout:
        lines.append((time.perf_counter() - t0, line.rstrip()))
        print(f"  [{lines[-1][0]:7.1f} s] {line.rstrip()}", flush=True)
    _, status, usage = os.wait4(proc.pid, 0)
    sampler.done = True
    sampler.join()
    return {"rc": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - t0, "lines": lines,
            "samples": sampler.samples, "peak": usage.ru_maxrss * 1024}


def parse_plan(text: str) -> dict:
    stages = {}
    for m in re.finditer(r"^\s+(\S.*?)\s{2,}([\d.]+) GB\s+([\d.]+) GB\s+([\d.]+) GB", text, re.M):
        stages[m.group(1).strip()] = float(m.group(4))
    peak = re.search(r"expected peak ([\d.]+) GB of ([\d.]+) GB", text)
    if not peak:
        raise SystemExit(f"could not read the plan:\n{text}")
    return {"stages": stages, "peak": float(peak.group(1)), "limit": float(peak.group(2)), "text": text}


# The command's stage events (--json) against the plan's stages: stage 1 also makes the encode the plan lists apart.
PLAN_STAGES = {"caption": ("caption",), "stage1": ("stage-1", "encode"), "condition": ("text encoders",),
               "sample": ("diffusion",), "decode": ("decode",)}


def segments(run: dict) -> list[tuple[str, float, float]]:
    """(stage, start, end) in seconds from the process start: 'load' until the first stage event, then each stage
    from its first event to the next stage's (the process's own --json events)."""
    marks = []
    for t, line in run["lines"]:
        if line.startswith("{"):
            e = json.loads(line)
            if e.get("event") == "stage" and (not marks or marks[-1][0] != e["stage"]):
                marks.append((e["stage"], t))
    bounds = [("load", 0.0)] + marks + [("end", run["seconds"])]
    return [(name, t0, t1) for (name, t0), (_, t1) in zip(bounds, bounds[1:])]


def report(name: str, run: dict, plan: dict) -> None:
    s = run["samples"]
    print(f"\n{name}: exit {run['rc']}, {run['seconds']:.0f} s wall")
    print(f"  {'stage':10s} {'time':>8s} {'resident max':>13s} {'anon':>7s} {'file':>7s} {'planned':>9s}")
    for stage, t0, t1 in segments(run):
        inside = [r for r in s if t0 <= r[0] < t1] or [(0, 0, 0, 0, 0)]
        top = max(inside, key=lambda r: r[1])
        planned = [v for k, v in plan["stages"].items() if k.startswith(PLAN_STAGES.get(stage, ("-",)))]
        print(f"  {stage:10s} {t1 - t0:7.0f}s {top[1] / GB:10.2f} GB {top[2] / GB:7.2f} {top[3] / GB:7.2f} "
              f"{max(planned) if planned else float('nan'):6.2f} GB")
    err = run["peak"] / GB / plan["peak"] - 1
    print(f"  process peak (VmHWM) {run['peak'] / GB:.2f} GB; plan: expected peak {plan['peak']:.2f} GB of "
          f"{plan['limit']:.2f} GB: {err:+.1%} against the plan, "
          f"{'within' if run['peak'] / GB <= plan['limit'] else 'ABOVE'} the limit")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for checkpoints, cache and outputs")
    ap.add_argument("--size", type=int, default=512, help="input side in pixels")
    ap.add_argument("--upscale", type=float, default=2.0)
    ap.add_argument("--memory-limit", type=float, default=8.0)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--runs", choices=("both", "convert", "cached"), default="both")
    ap.add_argument("--extra", default="", help="further restore options, e.g. '--dtype float32'")
    a = ap.parse_args()

    a.work.mkdir(parents=True, exist_ok=True)
    sdxl_path, supir_path = a.work / "sd_xl_base_1.0_random.safetensors", a.work / "SUPIR-v0Q_random.safetensors"
    sdxl, supir = official_sources(manifests_dir())
    t = time.perf_counter()
    write_random_safetensors(sdxl_path, sdxl, 0)
    write_random_safetensors(supir_path, supir, 1)
    print(f"checkpoints: {sdxl_path} ({sdxl_path.stat().st_size / GB:.2f} GB), {supir_path} "
          f"({supir_path.stat().st_size / GB:.2f} GB) ready in {time.perf_counter() - t:.0f} s")
    photo = a.work / f"photo{a.size}.png"
    test_photo(photo, a.size)

    exe = [str(Path(sys.executable).parent / "supir-mlx")]  # the installed command, as a user runs it
    common = [str(photo), "--upscale", str(a.upscale), "--sdxl", str(sdxl_path), "--supir", str(supir_path),
              "--offline", "--captioner", "none", "--steps", str(a.steps), "--memory-limit", str(a.memory_limit),
              *a.extra.split()]
    events = ["--json"]  # stage events on stdout mark where each stage starts
    env = {**os.environ, "SUPIR_MLX_HOME": str(a.work / "home")}
    planned = subprocess.run([*exe, "restore", *common, "--plan"], env=env, capture_output=True, text=True)
    print(planned.stdout + planned.stderr)
    plan = parse_plan(planned.stdout + planned.stderr)

    runs = {}
    if a.runs in ("both", "convert"):
        subprocess.run(["rm", "-rf", str(a.work / "home")], check=True)
        print("\nfirst run (converts the checkpoints into the cache):")
        runs["first run (converting)"] = run_restore(
            [*exe, "restore", *common, *events, "-o", str(a.work / "out_first.png"), "--overwrite"], env)
    if a.runs in ("both", "cached"):
        print("\nsecond run (from the cache):")
        runs["second run (cached weights)"] = run_restore(
            [*exe, "restore", *common, *events, "-o", str(a.work / "out_cached.png"), "--overwrite"], env)
    for name, run in runs.items():
        report(name, run, plan)
    (a.work / "samples.json").write_text(json.dumps({k: {**v, "lines": v["lines"]} for k, v in runs.items()}))


if __name__ == "__main__":
    main()
