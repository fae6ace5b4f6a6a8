"""Peak memory and time of the VAE decoder/encoder: untiled, the official tiled VAE with its tile states
in RAM, and the same with the states spilled to a scratch file (identical numbers), random weights.

    python bench/bench_tiled_vae.py --latent 48 --decoder-tile 16            # tiny VAE dims (fast on CPU)
    python bench/bench_tiled_vae.py --full --latent 64 --decoder-tile 32      # SDXL VAE dims

Prints measured peak (mx.get_peak_memory) next to the estimate of supir_mlx.pipeline.tiled_vae.estimate_bytes,
and for the spilled passes the scratch-disk peak and traffic of spill_traffic.
"""

from __future__ import annotations

import argparse
import gc
import time

import mlx.core as mx

from supir_mlx.config import VAEConfig
from supir_mlx.models.vae import AutoencoderKL
from supir_mlx.pipeline.tiled_vae import estimate_bytes, spill_traffic, tiled_decode, tiled_encode_with_denoise

TINY = VAEConfig(ch=32)


def measure(label: str, fn, estimate: int) -> None:
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    t = time.perf_counter()
    mx.eval(fn())
    dt = time.perf_counter() - t
    peak = mx.get_peak_memory() - base
    print(f"{label:28s} {dt:7.2f} s   peak {peak / 2**20:8.1f} MiB   estimate {estimate / 2**20:8.1f} MiB")


def spill(cfg, what: str, tile: int, is_decoder: bool, size: int, side: int, fn) -> None:
    """A budget of 1 byte forces the spilled mode."""
    measure(f"{what} spilled ({tile})", fn, estimate_bytes(cfg, side, side, tile, is_decoder, size, spill=True))
    disk, written, read = spill_traffic(cfg, side, side, tile, is_decoder, size)
    print(f"{'':28s} scratch disk {disk / 2**20:.1f} MiB, written {written / 2**20:.1f} MiB, read {read / 2**20:.1f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="SDXL VAE dimensions instead of the tiny ones")
    ap.add_argument("--latent", type=int, default=48, help="latent side (image side = 8x)")
    ap.add_argument("--decoder-tile", type=int, default=16)
    ap.add_argument("--encoder-tile", type=int, default=128)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--skip-untiled", action="store_true")
    ap.add_argument("--skip-spill", action="store_true")
    args = ap.parse_args()
    cfg = VAEConfig() if args.full else TINY
    dtype = mx.bfloat16 if args.bf16 else mx.float32
    vae = AutoencoderKL(cfg)
    vae.set_dtype(dtype)
    mx.eval(vae.parameters())
    n = args.latent
    z = mx.random.normal((1, n, n, cfg.embed_dim))
    x = mx.random.uniform(-1, 1, (1, 8 * n, 8 * n, 3))
    mx.eval(z, x)
    size = dtype.size
    print(f"VAE ch={cfg.ch} {dtype}, image {8 * n}x{8 * n}, latent {n}x{n}")
    big = 1 << 30
    if not args.skip_untiled:
        measure("decode untiled", lambda: vae.decode(z), estimate_bytes(cfg, 8 * n, 8 * n, big, True, size))
    side = 8 * n
    measure(
        f"decode tiled ({args.decoder_tile})",
        lambda: tiled_decode(vae, z, args.decoder_tile),
        estimate_bytes(cfg, side, side, args.decoder_tile, True, size),
    )
    if not args.skip_spill:
        spill(cfg, "decode", args.decoder_tile, True, size, side, lambda: tiled_decode(vae, z, args.decoder_tile, 1))
    if not args.skip_untiled:
        measure("encode untiled", lambda: vae.encode_with_denoise(x), estimate_bytes(cfg, 8 * n, 8 * n, big, False, size))
    measure(
        f"encode tiled ({args.encoder_tile})",
        lambda: tiled_encode_with_denoise(vae, x, args.encoder_tile),
        estimate_bytes(cfg, side, side, args.encoder_tile, False, size),
    )
    if not args.skip_spill:
        spill(cfg, "encode", args.encoder_tile, False, size, side, lambda: tiled_encode_with_denoise(vae, x, args.encoder_tile, 1))


if __name__ == "__main__":
    main()
