"""`supir-mlx watch IN -o OUT [restore options]`: restore every image that lands in a folder.

The restore command's flow and options (weights loaded once), fed by a FolderWatcher (supir_mlx.io.watch) instead
of a list of inputs. Ctrl-C or SIGTERM stops it cleanly: `--on-stop abandon` (default) drops the image in progress
(no partial file; a restart redoes it), `--on-stop finish` completes it first (a second signal abandons it).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import click

from .restore import KNOBS, Fail, _restore
from .restore import restore as _restore_command

# restore options that make no sense for a folder that keeps receiving files
_NOT_FOR_WATCH = {"inputs", "output", "plan_only", "draft", "overwrite"}


class _Stop:
    """SIGINT/SIGTERM handler: idle, stop at once; busy, abandon the image (KeyboardInterrupt: the atomic writer
    leaves nothing) or, with `finish`, let it complete and stop after it."""

    def __init__(self, finish: bool):
        self.finish, self.busy, self.flag = finish, False, threading.Event()

    def __call__(self, signum, frame) -> None:
        first = not self.flag.is_set()
        self.flag.set()
        if not self.busy:
            return
        if self.finish and first:
            click.echo("stopping after the image in progress (signal again to abandon it)", err=True)
            return
        raise KeyboardInterrupt


def _watch(folder, output, settle, poll, on_stop, **options) -> None:
    """Restore every image that appears in FOLDER into OUTPUT once its writer has finished with it.

    Takes the restore command's options. Files already in FOLDER are restored first; existing outputs are
    skipped, so a restart redoes nothing that finished and picks up everything still pending. Outputs are
    generative reconstructions (every output says so in its metadata); inputs are never modified.
    """
    from ..events import Event, JsonLines
    from ..io.watch import FolderWatcher, run_watch

    emit = JsonLines() if options.pop("json_events") else None
    knobs = {k: options.pop(k) for k in KNOBS if k in options}
    stop = _Stop(on_stop == "finish")
    try:
        folder, output = Path(folder), Path(output)
        if not folder.is_dir():
            raise Fail(f"{folder}: not a folder")
        from ..distributed import world

        if world() is not None:
            raise Fail("watch runs on one Mac (under mlx.launch every rank would restore every file); "
                       "share a batch with `mlx.launch ... supir-mlx restore FOLDER` instead")
        if "{index}" in options["pattern"]:
            raise Fail("--pattern: {index} depends on arrival order, so a restarted watch would name outputs differently")
        if os.path.realpath(output) == os.path.realpath(folder) or (
                options["recursive"] and Path(os.path.realpath(output)).is_relative_to(os.path.realpath(folder))):
            raise Fail(f"{output}: the output folder must be outside the watched folder (outputs would be restored again)")

        def watch(process, on_event):
            def guarded(item):
                stop.busy = True
                try:
                    return process(item)
                finally:
                    stop.busy = False

            output.mkdir(parents=True, exist_ok=True)
            from .restore import OUTPUT_FORMATS

            ext = OUTPUT_FORMATS.get(options["fmt"]) if options["fmt"] else None
            with FolderWatcher(folder, recursive=options["recursive"], settle=settle, poll=poll,
                               use_events=not poll_only) as watcher:
                click.echo(f"watching {folder} -> {output} ({watcher.backend}); Ctrl-C to stop", err=True)
                return run_watch(watcher, guarded, output, pattern=options["pattern"], ext=ext, stop=stop.flag,
                                 on_event=on_event)

        poll_only = poll is not None
        poll = poll or 2.0
        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            _restore((str(folder),), output, emit=emit, knobs=knobs, watch=watch, plan_only=False, draft=False,
                     overwrite=False, **options)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
    except click.ClickException as e:
        if emit is not None:
            emit(Event("error", {"message": e.format_message()}))
        raise


def _command() -> click.Command:
    params = [
        click.Argument(["folder"], type=click.Path(path_type=Path)),
        click.Option(["-o", "--output"], required=True, type=click.Path(file_okay=False, path_type=Path),
                     help="Output folder (outside the watched one)."),
        click.Option(["--settle"], type=click.FloatRange(0), default=3.0, show_default=True,
                     help="Seconds a file's size and modification time must stay unchanged before it is restored."),
        click.Option(["--poll"], type=click.FloatRange(0.1),
                     help="Scan the folder every POLL seconds instead of using filesystem events."),
        click.Option(["--on-stop"], type=click.Choice(["abandon", "finish"]), default="abandon", show_default=True,
                     help="On Ctrl-C / SIGTERM: drop the image in progress (redone on restart) or finish it first."),
    ]
    params += [p for p in _restore_command.params if p.name not in _NOT_FOR_WATCH]
    return click.Command("watch", params=params, callback=_watch, help=_watch.__doc__)


watch = _command()
