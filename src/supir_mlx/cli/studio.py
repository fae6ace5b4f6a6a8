"""`supir-mlx studio [FOLDER] [-o OUT]`: the local web app, over the same Restorer as `restore`."""

from __future__ import annotations

import secrets
import tempfile
import webbrowser
from pathlib import Path

import click

from .restore import Fail

EXTRA = 'the studio needs its extra: pip install -e ".[studio]"  (or: pip install "supir-mlx[studio]")'


@click.command()
@click.argument("folder", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Folder that Save writes into (default: FOLDER, else the current folder).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but 127.0.0.1/localhost exposes the studio on the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=7860, show_default=True, help="Port (a free one if taken).")
@click.option("--no-browser", is_flag=True, help="Print the link instead of opening the default browser.")
@click.option("--max-upload", type=click.FloatRange(1, 10_000), default=200, show_default=True, help="Upload limit in MB.")
@click.option("--weights", type=click.Path(exists=True, file_okay=False, path_type=Path), help="A folder written by `supir-mlx convert`.")
@click.option("--sdxl", help="SDXL base checkpoint: local path or owner/repo/file.")
@click.option("--supir", help="SUPIR checkpoint: local path or owner/repo/file.")
@click.option("--model", type=click.Choice(["v0Q", "v0F"]), default="v0Q", show_default=True)
@click.option("--captioner", type=click.Choice(["auto", "13b", "7b", "none"]), default="auto", show_default=True)
@click.option("--captioner-weights", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]))
@click.option("--quantize", type=click.Choice(["4", "8"]))
@click.option("--memory-limit", type=float, help="Memory budget in GB.")
@click.option("--offline", is_flag=True, help="Never contact the Hugging Face hub.")
@click.option("--no-credentials", is_flag=True, help="Save without C2PA Content Credentials.")
@click.option("--signing-cert", type=click.Path(dir_okay=False, path_type=Path), help="PEM certificate chain for the Content Credentials.")
@click.option("--signing-key", type=click.Path(dir_okay=False, path_type=Path), help="PEM private key for the Content Credentials.")
def studio(folder, output, host, port, no_browser, max_upload, weights, sdxl, supir, model, captioner,
           captioner_weights, dtype, quantize, memory_limit, offline, no_credentials, signing_cert, signing_key) -> None:
    """Open the Studio: add photos, edit the caption, watch the restore, compare and save.

    Serves a page on this computer only (unless --host says otherwise); the link it opens carries a secret
    token without which every request is refused. The model loads once and stays warm between photos.
    """
    try:
        from ..studio.engine import Studio, StudioError
        from ..studio.server import Server
    except ImportError as e:
        if getattr(e, "name", "") and e.name.split(".")[0] in ("starlette", "uvicorn", "anyio"):
            raise Fail(EXTRA) from None
        raise
    from .restore import _credentials, _load

    out = output or folder or Path.cwd()
    if out.exists() and not out.is_dir():
        raise Fail(f"{out}: not a folder")
    if no_credentials and (signing_cert or signing_key):
        raise Fail("--no-credentials contradicts --signing-cert/--signing-key")
    credentials = None if no_credentials else _credentials(signing_cert, signing_key)  # as `restore` signs
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: listening on {host}: anyone on the network with the link can use this studio and "
                   "read its photos", err=True)

    def load():
        # photos yet to come: the weights, quantization and captioner a typical photo needs, chosen where
        # `restore` and `watch` choose them (pipeline.planning); each photo is planned again when it runs
        from ..pipeline.planning import WATCH_SIZE, LoadOptions, plan_run
        from ..pipeline.settings import settings_for

        options = LoadOptions(weights=weights, model=model, sdxl=sdxl, supir=supir, captioner=captioner,
                              captioner_weights=captioner_weights, dtype=dtype,
                              quantize=int(quantize) if quantize else None, memory_limit_gb=memory_limit,
                              offline=offline)
        return _load(plan_run([WATCH_SIZE], settings_for(model=model), options, captioned=captioner != "none"))

    work = tempfile.TemporaryDirectory(prefix="supir-studio-")
    try:
        engine = Studio(load, out, Path(work.name), folder, max_upload_bytes=int(max_upload * 1e6),
                        credentials=credentials)
        server = Server(engine, secrets.token_urlsafe(24), host, port)
    except (StudioError, OSError) as e:
        work.cleanup()
        raise Fail(str(e)) from None
    engine.start()
    click.echo(f"supir-mlx studio: {server.url}\n  saving into {out}; Ctrl-C stops", err=True)
    if not no_browser:
        webbrowser.open(server.url)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on: stopping is the normal end
        pass
    finally:
        engine.stop(timeout=10)
        work.cleanup()
    click.echo("studio stopped", err=True)
