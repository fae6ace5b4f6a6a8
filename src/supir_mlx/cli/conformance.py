"""`supir-mlx conformance DIR`: replay the official implementation's fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-k", "--select", multiple=True, help="Run only these groups (folder name) or cases (name substring).")
@click.option("--rtol", type=float, default=None, help="Override every group's relative tolerance.")
@click.option("-v", "--verbose", is_flag=True, help="Print every compared output, not just the worst one per case.")
def conformance(directory: Path, select: tuple[str, ...], rtol: float | None, verbose: bool) -> None:
    """Run every fixture case in DIRECTORY (laid out like the SUPIR reference set).

    Prints one line per case and exits non-zero if any selected case fails or cannot run.
    """
    from ..conformance import run

    counts: dict[str, int] = {}
    for result in run(directory, select, rtol):
        click.echo(result.line())
        if verbose:
            for c in result.comparisons:
                mark = "ok" if c.ok else "FAIL"
                click.echo(f"    {c.output:40s} max_abs={c.max_abs:.2e} tol={c.tol:.2e} {mark}")
        counts[result.status] = counts.get(result.status, 0) + 1
    if not counts:
        click.echo(f"error: no fixture cases found in {directory}" + (f" matching {list(select)}" if select else ""), err=True)
        sys.exit(2)
    summary = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
    click.echo(summary)
    if set(counts) != {"PASS"}:
        sys.exit(1)
