"""supir-mlx against the official SUPIR PyTorch code, on the same machine, in one run: time and peak memory of
each piece of work on both sides, and their ratios.

    python bench/compare_official.py --official ~/src/SUPIR --torch-python ~/venvs/supir-torch/bin/python
    python bench/compare_official.py --cases denoiser:128            # the 1024-px latent on request
    python bench/compare_official.py --device gpu --dtype float16 --vae-dtype bfloat16   # a CUDA machine

The official side runs `bench/official_worker.py` in its own interpreter (a venv with torch==2.13.0 and the
official code's few imports; torch is never a dependency of supir-mlx) on a work tree of
https://github.com/Fanghua-Yu/SUPIR at commit OFFICIAL_COMMIT, named by --official or $SUPIR_OFFICIAL; the
interpreter by --torch-python or $SUPIR_TORCH_PYTHON. Its environment drops LD_PRELOAD (and MKL_THREADING_LAYER):
a preloaded Debian OpenBLAS replaces torch's own BLAS and made the official denoiser call 2.2x slower. The supir-mlx
side runs in this interpreter with the environment as given (on Linux CPU, with MKL or OpenBLAS preloaded, as
.ci/run and the README do).

Every measurement runs in a fresh process per side, so peaks do not mix: full-size networks with random weights,
a warm-up call (--warmup), then --runs timed calls; the time is their median and the peak is the highest memory
during them, weights included: the process resident set on CPU (VmHWM, reset before the timed calls), the
device allocator on a GPU. Cases (--cases, comma-separated):

    denoiser:S        control encoder + UNet through the denoiser, CFG batch 2, latent SxS (64 = 512 px)
    decode:P[:T]      VAE decoder, P-px output; T = decoder tile in latent px, or "plan" for the tile the
                      memory planner picks under --vae-budget (the case is left out when the plan is untiled)
    encode:P[:T]      SUPIR's denoise encoder pass, P-px input; T = encoder tile in px, or "plan"
    text              CLIP ViT-L + OpenCLIP bigG on 2 prompts x 77 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
OFFICIAL_COMMIT = "bda91af2000042f8bedfec8897d92917e67c1d88"
DEFAULT_CASES = "denoiser:64,decode:512,encode:512,decode:1024,encode:1024,decode:1024:plan,encode:1024:plan,text"
GB = 1e9


@dataclass(frozen=True)
class Case:
    kind: str  # denoiser | decode | encode | text
    size: int = 0
    tile: int = 0  # 0: untiled

    @property
    def label(self) -> str:
        if self.kind == "text":
            return "text encoders (2 x 77 tokens)"
        if self.kind == "denoiser":
            return f"denoiser call, latent {self.size}x{self.size}, CFG batch 2"
        what = "VAE decode" if self.kind == "decode" else "VAE denoise-encoder pass"
        unit = "latent px" if self.kind == "decode" else "px"
        return f"{what}, {self.size} px, " + (f"tile {self.tile} {unit}" if self.tile else "untiled")


def parse_cases(spec: str, vae_budget_gb: float, vae_dtype_size: int) -> list[Case]:
    cases = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        kind = parts[0]
        if kind not in ("denoiser", "decode", "encode", "text") or (kind != "text" and len(parts) < 2):
            raise SystemExit(f"error: unknown case {item!r} (denoiser:S, decode:P[:T], encode:P[:T], text)")
        if kind == "text":
            cases.append(Case("text"))
            continue
        size, tile = int(parts[1]), 0
        if len(parts) > 2:
            if parts[2] == "plan":
                tile = planned_tile(kind, size, vae_budget_gb, vae_dtype_size)
                if not tile:
                    print(f"note: {item}: the planner runs this pass untiled under {vae_budget_gb:g} GB; left out")
                    continue
            else:
                tile = int(parts[2])
        cases.append(Case(kind, size, tile))
    return cases


def planned_tile(kind: str, size: int, budget_gb: float, dtype_size: int) -> int:
    """The VAE tile `restore` would use for a size x size image (0: untiled), as memory.plan picks it."""
    from supir_mlx.config import VAEConfig
    from supir_mlx.pipeline.tiled_vae import plan_tiles

    cfg = VAEConfig()
    plan = plan_tiles(cfg, size, size, int(budget_gb * GB), dtype_size)
    if kind == "decode":
        return plan.decoder_tile if plan.decoder_tile < -(-size // cfg.downsample_factor) else 0
    return plan.encoder_tile if plan.encoder_tile < size else 0


# ------------------------------------------------------------------------------------------------ MLX side


def mlx_case(kind: str, size: int, tile: int, dtype):
    """A call of a full-size random-weight network for one case, its weights and inputs evaluated, so the
    caller times the call alone."""
    import mlx.core as mx

    from supir_mlx.config import SUPIRConfig
    from supir_mlx.models.supir import Condition, ControlledUNet
    from supir_mlx.models.vae import AutoencoderKL
    from supir_mlx.pipeline.tiled_vae import tiled_decode, tiled_encode_with_denoise
    from supir_mlx.sampling.denoiser import DENOISER

    cfg = SUPIRConfig.sdxl_v0()
    key = iter(mx.random.split(mx.random.key(1), 8))
    if kind == "denoiser":
        model = ControlledUNet(cfg)
        model.set_dtype(dtype)  # before the lazy random init is evaluated: no float32 copy ever exists
        x = mx.random.normal((2, size, size, 4), key=next(key))
        cond = Condition(
            crossattn=mx.random.normal((2, 77, 2048), key=next(key)).astype(dtype),
            vector=mx.random.normal((2, 2816), key=next(key)).astype(dtype),
            control=mx.random.normal((2, size, size, 4), key=next(key)).astype(dtype),
        )
        inputs = [x, cond.crossattn, cond.vector, cond.control]

        def call():
            return DENOISER(model, x, 5.0, cond, 1.0)

    elif kind in ("decode", "encode"):
        model = AutoencoderKL(cfg.vae)
        model.set_dtype(dtype)
        if kind == "decode":
            z = mx.random.normal((1, size // 8, size // 8, 4), key=next(key))
            inputs = [z]

            def call():
                return tiled_decode(model, z, tile) if tile else model.decode(z)

        else:
            img = mx.random.uniform(-1, 1, (1, size, size, 3), key=next(key))
            inputs = [img]

            def call():
                return tiled_encode_with_denoise(model, img, tile) if tile else model.encode_with_denoise(img)

    else:
        from supir_mlx.models.conditioner import Conditioner

        model = Conditioner(cfg)
        model.set_dtype(dtype)
        ids = mx.random.randint(1, 49407, (2, 77), key=next(key))
        ids[:, -1] = 49407
        inputs = [ids]
        clip_l, bigg = model.embedders

        def call():
            return clip_l(ids), bigg(ids)

    mx.eval(model.parameters(), inputs)
    return call


def mlx_worker(args: argparse.Namespace) -> None:
    import mlx.core as mx

    from peak import ResidentPeak

    gpu = args.device == "gpu"
    mx.set_default_device(mx.gpu if gpu else mx.cpu)
    t0 = time.perf_counter()
    call = mlx_case(args.case, args.size, args.tile, getattr(mx, args.dtype))
    mx.synchronize()
    build_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        mx.eval(call())
    rss = ResidentPeak()
    mx.reset_peak_memory()
    times = []
    for _ in range(args.runs):
        t = time.perf_counter()
        mx.eval(call())
        times.append(time.perf_counter() - t)
    alloc = mx.get_peak_memory()
    print(json.dumps({
        "side": "mlx", "mlx": mx.__version__, "build_s": build_s, "times": times,
        "median": statistics.median(times), "peak": alloc if gpu else rss.peak(),
        "peak_kind": "mlx allocator" if gpu else rss.kind, "allocator_peak": alloc,
    }))


# ------------------------------------------------------------------------------------------------ driver


def official_env() -> dict[str, str]:
    """This environment without what is preloaded for supir-mlx: torch brings its own BLAS (MKL, linked in), which
    nothing may replace or configure."""
    return {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MKL_THREADING_LAYER")}


def run_side(cmd: list[str], env: dict[str, str], timeout: float) -> dict:
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {p.returncode}: {tail[0][:200]}"}
    return json.loads(lines[-1])


def official_commit(tree: Path) -> str:
    if (tree / "COMMIT").is_file():  # an export made by gpu_pack.py
        return (tree / "COMMIT").read_text().strip()
    try:
        return subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git work tree)"


def fmt_time(r: dict) -> str:
    return f"{r['median']:.3f} s" if "median" in r else r.get("error", "-")


def fmt_peak(r: dict) -> str:
    return f"{r['peak'] / GB:.2f} GB" if "peak" in r else "-"


def ratio(a: dict, b: dict, key: str) -> str:
    return f"{b[key] / a[key]:.2f}x" if key in a and key in b and a[key] else "-"


def combine(measurements: list[dict]) -> dict:
    """One side's rounds of a case as one result: the median of the rounds' medians, every time, the highest peak;
    the first error if any round failed."""
    errors = [r for r in measurements if "error" in r]
    if errors:
        return errors[0]
    out = dict(measurements[0])
    out["median"] = statistics.median(r["median"] for r in measurements)
    out["times"] = [t for r in measurements for t in r["times"]]
    out["peak"] = max(r["peak"] for r in measurements)
    return out


def time_ratio(row: dict) -> str:
    """The median of the rounds' time ratios (supir-mlx over official), with their range when there are several."""
    ratios = row.get("ratios") or []
    if not ratios:
        return "-"
    text = f"{statistics.median(ratios):.2f}x"
    return text + f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--official", default=os.environ.get("SUPIR_OFFICIAL"), help="official SUPIR work tree")
    ap.add_argument("--torch-python", default=os.environ.get("SUPIR_TORCH_PYTHON"),
                    help="python of the venv with torch for the official side")
    ap.add_argument("--cases", default=DEFAULT_CASES)
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--dtype", default="float32", help="networks' dtype (float32, float16, bfloat16)")
    ap.add_argument("--vae-dtype", default=None, help="VAE dtype (default: --dtype; the official runs bf16 on GPU)")
    ap.add_argument("--vae-budget", type=float, default=8.0, help="GB the planner gives the VAE passes ('plan' tiles)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure each case this many times per side, alternating which side goes first")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for both sides (0: their defaults)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per measurement and side")
    ap.add_argument("--side", choices=("both", "mlx", "official"), default="both")
    ap.add_argument("--json", type=Path, help="also write the results here")
    # one measurement of the supir-mlx side (what the driver runs in a subprocess)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--tile", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    if args.worker:
        mlx_worker(args)
        return

    vae_dtype = args.vae_dtype or args.dtype
    sides = ("official", "mlx") if args.side == "both" else (args.side,)
    if "official" in sides and not (args.official and args.torch_python):
        raise SystemExit("error: the official side needs --official DIR and --torch-python PYTHON "
                         "(or $SUPIR_OFFICIAL / $SUPIR_TORCH_PYTHON); --side mlx runs supir-mlx alone")
    cases = parse_cases(args.cases, args.vae_budget, 2 if vae_dtype != "float32" else 4)
    env_mlx = dict(os.environ)
    env_official = official_env()
    if args.threads:
        for env in (env_mlx, env_official):
            env.update(OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
                       MKL_NUM_THREADS=str(args.threads))

    import mlx.core as mx

    header = [
        f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs; device {args.device}; "
        f"dtype {args.dtype}, VAE {vae_dtype}; threads {args.threads or 'default'}; "
        f"median of {args.runs} after {args.warmup} warm-up, {args.rounds} round(s); {time.strftime('%Y-%m-%d')}",
        f"supir-mlx: mlx {mx.__version__}, LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}",
    ]
    if "official" in sides:
        header.append(f"official: {args.official} at {official_commit(Path(args.official))} "
                      f"(pinned {OFFICIAL_COMMIT[:7]}), {args.torch_python}, no LD_PRELOAD")
    print("\n".join(header), flush=True)

    results = []
    for case in cases:
        dtype = args.dtype if case.kind in ("denoiser", "text") else vae_dtype
        common = ["--case", case.kind, "--size", str(case.size), "--tile", str(case.tile), "--dtype", dtype,
                  "--device", args.device, "--runs", str(args.runs), "--warmup", str(args.warmup)]
        row = {"case": case.label, "dtype": dtype}

        def measure(side: str) -> dict:
            if side == "official":
                cmd = [args.torch_python, str(HERE / "official_worker.py"), "--official", args.official,
                       "--threads", str(args.threads), *common]
                return run_side(cmd, env_official, args.timeout)
            return run_side([sys.executable, str(Path(__file__).resolve()), "--worker", *common], env_mlx,
                            args.timeout)

        # rounds alternate which side goes first (A B, B A, ...): a machine that slows down or speeds up during
        # the run then weighs on both sides alike, and each round's ratio compares neighbours in time
        rounds = [{side: measure(side) for side in (sides if r % 2 == 0 else sides[::-1])} for r in range(args.rounds)]
        for side in sides:
            row[side] = combine([rd[side] for rd in rounds])
        row["ratios"] = [rd["mlx"]["median"] / rd["official"]["median"] for rd in rounds
                         if "median" in rd.get("mlx", {}) and "median" in rd.get("official", {})]
        results.append(row)
        o, m = row.get("official", {}), row.get("mlx", {})
        print(f"{case.label:58s} official {fmt_time(o):>12s} {fmt_peak(o):>9s} | supir-mlx {fmt_time(m):>12s} "
              f"{fmt_peak(m):>9s} | time {time_ratio(row):>6s} memory {ratio(o, m, 'peak'):>6s}", flush=True)

    print("\n| work | dtype | official time | supir-mlx time | time ratio | official peak | supir-mlx peak | memory ratio |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in results:
        o, m = row.get("official", {}), row.get("mlx", {})
        print(f"| {row['case']} | {row['dtype']} | {fmt_time(o)} | {fmt_time(m)} | {time_ratio(row)} | "
              f"{fmt_peak(o)} | {fmt_peak(m)} | {ratio(o, m, 'peak')} |")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "results": results}, indent=1))


if __name__ == "__main__":
    main()
