"""Peak memory and time of one sampler step: CFG as one batch-2 call vs two batch-1 calls, untiled vs tiled.

    python bench/bench_sampling.py --latent 64                  # tiny UNet dims (tests/reference/tiny), fast on CPU
    python bench/bench_sampling.py --full --latent 64 --tile 32  # SDXL + SUPIR dims, random weights (~12 GB fp32)

Random weights: the numbers are about memory and time, not images.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import mlx.core as mx

from supir_mlx.config import SUPIRConfig
from supir_mlx.models.supir import Condition, ControlledUNet
from supir_mlx.sampling import SamplerOptions, SeededNoise, Tiling, guided_denoiser, initial_noise_scale, legacy_sigmas
from supir_mlx.sampling.edm import sample_restore_edm
from supir_mlx.sampling.tiled import sample_tiled_restore_edm

TINY_CONFIG = Path(__file__).parent.parent / "tests" / "reference" / "tiny" / "config.json"


def measure(label: str, fn) -> None:
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    t = time.perf_counter()
    mx.eval(fn())
    dt = time.perf_counter() - t
    print(f"{label:34s} {dt:7.2f} s   peak {(mx.get_peak_memory() - base) / 2**20:9.1f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="SDXL + SUPIR dimensions instead of the tiny ones")
    ap.add_argument("--latent", type=int, default=64, help="latent side (image side = 8x)")
    ap.add_argument("--tile", type=int, default=32, help="tile side in latent pixels for the tiled step")
    args = ap.parse_args()

    config = SUPIRConfig.sdxl_v0() if args.full else SUPIRConfig.from_reference(TINY_CONFIG)
    net = ControlledUNet(config)
    mx.eval(net.parameters())
    noise = SeededNoise(0)
    n = args.latent
    control = noise.next((1, n, n, 4))

    def condition() -> Condition:
        return Condition(noise.next((1, 77, config.unet.context_dim)), noise.next((1, config.unet.adm_in_channels)), control)

    c, uc = condition(), condition()
    x = noise.next((1, n, n, 4)) * initial_noise_scale()
    sigmas = legacy_sigmas(50)[:2]  # one step
    opts = SamplerOptions()
    print(f"{'full' if args.full else 'tiny'} dims, latent {n}x{n}, one EDM step")
    for batched in (True, False):
        fn = guided_denoiser(net, c, uc, batched=batched)
        measure(f"untiled, CFG {'batch 2' if batched else '2 x batch 1'}", lambda: sample_restore_edm(fn, x, sigmas, opts))
    tiling = Tiling(args.tile, args.tile // 2)
    tiles = len(tiling.windows(n, n))
    for batched in (True, False):
        fn = guided_denoiser(net, c, uc, batched=batched)
        measure(
            f"{tiles} tiles of {args.tile}, CFG {'batch 2' if batched else '2 x batch 1'}",
            lambda: sample_tiled_restore_edm(fn, x, sigmas, opts, tiling),
        )


if __name__ == "__main__":
    main()
