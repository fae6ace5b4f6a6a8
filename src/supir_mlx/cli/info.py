"""`supir-mlx info FILE...`: show the provenance supir-mlx embedded in an output."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the embedded records as JSON.")
def info(files: tuple[Path, ...], as_json: bool) -> None:
    """Show how FILES were made: model, base checkpoint, caption, seed and every setting.

    Exits non-zero if a file cannot be read or carries no supir-mlx record.
    """
    from ..io.images import ImageError
    from ..io.metadata import read_provenance

    records, failed = {}, False
    for f in files:
        try:
            prov = read_provenance(f)
        except ImageError as e:
            click.echo(f"error: {e}", err=True)
            failed = True
            continue
        if prov is None:
            click.echo(f"error: {f}: no supir-mlx record (not made by supir-mlx, or metadata stripped)", err=True)
            failed = True
            continue
        records[str(f)] = prov
        if not as_json:
            click.echo(f"{f}\n  {prov.get('notice', '')}")
            for key in ("generator", "created", "model", "base_checkpoint", "seed", "caption", "source"):
                if prov.get(key) is not None:
                    click.echo(f"  {key:16s} {prov[key]}")
            for key, value in sorted((prov.get("settings") or {}).items()):
                click.echo(f"  {'settings.' + key:16s} {value}")
    if as_json:
        click.echo(json.dumps(records if len(files) > 1 else next(iter(records.values()), {}), indent=2))
    if failed:
        sys.exit(1)
