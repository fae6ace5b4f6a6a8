"""`supir-mlx caption IMAGE...` (the LLaVA caption SUPIR would use) and `supir-mlx convert-llava SRC [DST]`."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import click


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="Converted captioner folder (default: the 13B 4-bit one under ~/.cache/supir-mlx).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampled caption.")
@click.option("--greedy", is_flag=True, help="Most likely tokens instead of sampling (temperature 0.2, top-p 0.7).")
@click.option("--question", default=None, help="Ask this instead of SUPIR's question.")
@click.option("--write-sidecar", is_flag=True, help="Write each caption to a .txt file beside its image.")
@click.option("--overwrite", is_flag=True, help="Replace existing sidecar files (otherwise they are kept and skipped).")
def caption(images: tuple[Path, ...], weights: Path | None, seed: int, greedy: bool, question: str | None,
            write_sidecar: bool, overwrite: bool) -> None:
    """Print the LLaVA-1.5 caption of each IMAGE, as SUPIR writes its restoration prompt."""
    from PIL import Image, ImageOps

    from ..captioner import QUESTION, Captioner, CaptionerUnavailable

    todo = [p for p in images if not (write_sidecar and p.with_suffix(".txt").exists() and not overwrite)]
    for p in sorted(set(images) - set(todo)):
        click.echo(f"{p}: kept existing {p.with_suffix('.txt').name} (--overwrite replaces it)", err=True)
    if not todo:
        return
    try:
        captioner = Captioner.load(weights, question=question or QUESTION)
    except (CaptionerUnavailable, ValueError) as e:
        raise click.ClickException(str(e)) from None
    failed = 0
    with captioner:
        for p in todo:
            try:
                with Image.open(p) as im:
                    image = ImageOps.exif_transpose(im).convert("RGB")
            except (OSError, ValueError) as e:
                click.echo(f"error: cannot read image {p}: {e}", err=True)
                failed += 1
                continue
            text = captioner.caption(image, seed=seed, greedy=greedy)
            click.echo(text if len(images) == 1 else f"{p}: {text}")
            if write_sidecar:
                write_atomic(p.with_suffix(".txt"), text + "\n")
    if failed:
        sys.exit(1)


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one, never a partial write."""
    from ..io.images import output_mode

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            os.fchmod(f.fileno(), output_mode(path))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@click.command("convert-llava")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.argument("destination", type=click.Path(path_type=Path), required=False)
@click.option("--clip", type=click.Path(exists=True, path_type=Path), default=None,
              help="openai/clip-vit-large-patch14-336 folder, for the original (liuhaotian) release.")
@click.option("--bits", type=click.Choice(["4", "8", "16"]), default="4", show_default=True,
              help="Language-model weights: 4- or 8-bit quantized, or 16 (float16, not quantized).")
@click.option("--size", type=click.Choice(["13b", "7b"]), default="13b", show_default=True,
              help="Only names the default DESTINATION.")
@click.option("--overwrite", is_flag=True, help="Replace an existing DESTINATION.")
def convert_llava(source: Path, destination: Path | None, clip: Path | None, bits: str, size: str, overwrite: bool) -> None:
    """Convert a downloaded LLaVA-1.5 (llava-hf or original layout, safetensors) once into the MLX captioner folder."""
    from ..weights.llava_convert import convert_llava as convert
    from ..weights.llava_convert import default_llava_dir

    n = int(bits)
    destination = destination or default_llava_dir(size, n)
    try:
        out = convert(source, destination, clip=clip, bits=None if n == 16 else n, overwrite=overwrite)
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"converted {source} -> {out}")
