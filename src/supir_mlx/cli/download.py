"""`supir-mlx download`: fetch every weight file a restore needs into the Hugging Face cache."""

from __future__ import annotations

import sys

import click

from ..weights import hub


@click.command()
@click.option("--model", type=click.Choice(hub.SUPIR_MODELS), default="v0Q", show_default=True, help="SUPIR checkpoint: v0Q (quality) or v0F (fidelity).")
@click.option("--source", type=click.Choice(hub.SUPIR_SOURCES), default="pruned", show_default=True, help="pruned: fp16 safetensors with only the SUPIR tensors (2.7 GB); original: the authors' .ckpt (5.3 GB).")
@click.option("--captioner", type=click.Choice(hub.CAPTIONERS), default="13b", show_default=True, help="LLaVA-1.5 size, or none to caption by hand.")
@click.option("--sdxl", metavar="PATH|OWNER/REPO/FILE", default=None, help="Another SDXL base (a local file or a hub file), e.g. a Juggernaut or Lightning checkpoint.")
@click.option("--supir", metavar="PATH|OWNER/REPO/FILE", default=None, help="A SUPIR checkpoint already on disk or elsewhere on the hub.")
@click.option("--offline", is_flag=True, help="Never contact the hub (same as HF_HUB_OFFLINE=1); report what is missing.")
@click.option("--verify", is_flag=True, help="Re-hash cached files against the hub's checksums.")
@click.option("--faces", is_flag=True, help="Also face mode's detector and parser (facexlib release files).")
def download(model: str, source: str, captioner: str, sdxl: str | None, supir: str | None, offline: bool, verify: bool,
             faces: bool) -> None:
    """Download (or locate) the SDXL base, the SUPIR checkpoint and the captioner.

    Interrupted downloads resume where they stopped; every file is checked against the hub's
    size and checksum. Prints one `component path` line per file.
    """
    try:
        got = hub.fetch(hub.required_files(model, source, captioner, sdxl, supir, faces=faces), offline=offline)
    except hub.WeightsUnavailable as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    bad = []
    for component, paths in got.items():
        for p in paths:
            if verify and component != "faces" and hub.verify_cached(p) is False:  # release files: verified on every use
                bad.append(p)
            click.echo(f"{component} {p}")
    if bad:
        click.echo(f"error: checksum mismatch for {', '.join(map(str, bad))}; delete and download again", err=True)
        sys.exit(1)
