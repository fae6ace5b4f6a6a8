"""`supir-mlx info FILE...`: show how an output was made, and check its Content Credentials."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the embedded records as JSON.")
def info(files: tuple[Path, ...], as_json: bool) -> None:
    """Show how FILES were made: model, base checkpoint, caption, seed and every setting, the IPTC digital
    source type, the fidelity summary, and the Content Credentials as the C2PA library validates them
    (signature, binding to the image data, signer).

    Exits non-zero if a file cannot be read, carries neither a supir-mlx record nor credentials, or does not
    match its credentials (changed after it was signed).
    """
    from ..io.images import ImageError
    from ..io.metadata import read_digital_source_type, read_provenance

    records, failed = {}, False
    for f in files:
        try:
            prov = read_provenance(f)
            source_type = read_digital_source_type(f)
        except ImageError as e:
            click.echo(f"error: {e}", err=True)
            failed = True
            continue
        creds = _credentials(f)
        if prov is None and not (creds and creds.get("manifest")):
            click.echo(f"error: {f}: no supir-mlx record (not made by supir-mlx, or metadata stripped)", err=True)
            failed = True
            continue
        if creds and creds.get("valid") is False:
            failed = True
        record = {**(prov or {}), "digital_source_type": source_type, "credentials": creds}
        records[str(f)] = record
        if not as_json:
            _print(f, record)
    if as_json:
        click.echo(json.dumps(records if len(files) > 1 else next(iter(records.values()), {}), indent=2))
    if failed:
        sys.exit(1)


def _credentials(path: Path) -> dict | None:
    """The library's verdict (io.credentials.summarize), None without credentials, or a note when the optional
    library is missing."""
    from ..io.credentials import CredentialsUnavailable, describe, read_credentials

    try:
        summary = read_credentials(path)
    except CredentialsUnavailable as e:
        return {"checked": False, "verdict": f"not checked: {e}"}
    if summary is not None:
        summary = {"checked": True, "verdict": describe(summary), **summary}
    return summary


def _print(path: Path, record: dict) -> None:
    click.echo(f"{path}\n  {record.get('notice', '')}".rstrip())
    for key in ("generator", "created", "model", "base_checkpoint", "seed", "caption", "source"):
        if record.get(key) is not None:
            click.echo(f"  {key:16s} {record[key]}")
    for key, value in sorted((record.get("settings") or {}).items()):
        click.echo(f"  {'settings.' + key:16s} {value}")
    if record.get("faces") is not None:
        fr = record["faces"]
        click.echo(f"  {'faces':16s} {fr['found']} restored ({fr['landmarks']} landmarks), {fr['dropped_small']} "
                   f"too small, background {fr['background']}")
        for i, face in enumerate(fr["faces"], 1):
            (x, y), caption = face["landmarks"][2], face["caption"]
            click.echo(f"  {f'face {i}':16s} nose at ({x:.0f}, {y:.0f}); caption: {caption}")
    for key, value in (record.get("fidelity") or {}).items():
        click.echo(f"  {'fidelity.' + key:16s} {value}")
    click.echo(f"  {'source type':16s} {record.get('digital_source_type') or 'none (no IPTC digital source type)'}")
    creds = record.get("credentials")
    if creds is None:
        click.echo(f"  {'credentials':16s} none (no C2PA Content Credentials)")
        return
    click.echo(f"  {'credentials':16s} {creds['verdict']}")
    if not creds.get("checked") or "signer" not in creds:
        return
    signer = creds["signer"]
    click.echo(f"  {'  signer':16s} {signer.get('common_name', '?')} (issuer {signer.get('issuer', '?')}, "
               f"{signer.get('alg', '?')}){', signed ' + signer['time'] if signer.get('time') else ''}")
    click.echo(f"  {'  generator':16s} {creds['claim_generator']}")
    for action in creds["actions"]:
        agent = action.get("softwareAgent")
        agent = f" by {agent.get('name')} {agent.get('version', '')}".rstrip() if isinstance(agent, dict) else ""
        source = action.get("digitalSourceType", "").rsplit("/", 1)[-1]
        params = {k: v for k, v in (action.get("parameters") or {}).items()
                  if k not in ("ingredients", "ingredientIds")}
        click.echo(f"  {'  action':16s} {action.get('action')}{agent}{f' ({source})' if source else ''}"
                   + (" " + ", ".join(f"{k}={v}" for k, v in params.items()) if params else ""))
    for ing in creds["ingredients"]:
        chain = ("no credentials of its own" if not ing["credentials"] else
                 f"its own credentials {'valid' if ing['credentials_valid'] else 'INVALID'}, kept in the chain")
        digest = f", sha256 {ing['sha256'][:16]}..." if ing.get("sha256") else ""
        click.echo(f"  {'  ingredient':16s} {ing['title']} ({ing['relationship']}{digest}; {chain})")
