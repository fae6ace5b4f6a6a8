"""`supir-mlx convert`: official checkpoints -> an MLX weights folder every other command can run from."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click


@click.command()
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path), help="New folder to write (must not exist).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None, help="Architecture config.json (ours or a reference one); default: the real SDXL/SUPIR-v0.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16", show_default=True, help="Weight dtype (the VAE stays float32 with float16).")
def convert(checkpoints: tuple[Path, ...], out_dir: Path, config_path: Path | None, dtype: str) -> None:
    """Convert SDXL_CKPT SUPIR_CKPT (in that order; or one file holding both) into an MLX weights folder.

    Reads .safetensors and torch .ckpt/.pt/.pth files (tensors only: no code in a checkpoint is ever
    run). Checks every tensor against the architecture before writing anything.
    """
    from ..config import ConfigError, SUPIRConfig
    from ..weights.convert import ConvertError
    from ..weights.convert import convert as run_convert

    if len(checkpoints) > 2:
        fail("give at most two checkpoints: the SDXL base, then the SUPIR checkpoint")
    try:
        config = SUPIRConfig.load(config_path) if config_path else None
    except FileNotFoundError:
        fail(f"config not found: {config_path}")
    except (ConfigError, ValueError) as e:
        fail(f"{config_path}: {e}")
    start = time.perf_counter()
    try:
        run_convert(checkpoints, out_dir, config, dtype, log=click.echo)
    except ConvertError as e:
        fail(str(e))
    click.echo(f"done in {time.perf_counter() - start:.1f} s")


def fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)
