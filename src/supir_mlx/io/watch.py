"""Watch folders: hand over each image that lands in a folder once its writer has finished with it.

    with FolderWatcher("inbox/", settle=3) as watcher:
        while True:
            for path in watcher.ready():       # stable files not handed out before (or changed since)
                restore(path)
            watcher.wait()                     # until the folder changes or a settling file may be ready

A file is ready when its size and modification time have stayed the same for `settle` seconds, so a copy, a
download or a scanner still writing it is left alone. Nothing is remembered across runs: a restart hands out
every file again and the batch rules (an existing output is skipped) make that redo nothing. Changes arrive
through filesystem events when the optional `watchdog` package is installed (FSEvents on macOS, inotify on Linux:
no delay and no rescans of an idle folder); without it, or on volumes that send no events, the folder is polled.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..events import EventCallback
from .batch import BatchItem, BatchSummary, _supported, output_path, run_batch


class FolderWatcher:
    """Ready files of `folder` (optionally its sub-folders), by stable size and modification time."""

    def __init__(self, folder: str | Path, *, recursive: bool = False, settle: float = 3.0, poll: float = 2.0,
                 use_events: bool = True):
        """`settle`: seconds a file must stay unchanged; `poll`: seconds between scans without filesystem events
        (with them, a scan every 30 s still catches what an event-less volume never reports)."""
        self.folder, self.recursive, self.settle = Path(folder), recursive, settle
        self._seen: dict[Path, tuple[int, int, float]] = {}  # path -> (size, mtime_ns, unchanged since: monotonic)
        self._handed: dict[Path, tuple[int, int]] = {}  # path -> (size, mtime_ns) when handed out
        self._wake = threading.Event()
        self._observer = None
        self.poll = poll
        self.backend = "polling"
        if use_events:
            self._start_events()

    def _start_events(self) -> None:
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:
            return
        wake = self._wake

        class Wake(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                wake.set()

        observer = Observer()
        try:
            observer.schedule(Wake(), str(self.folder), recursive=self.recursive)
            observer.start()
        except OSError:  # e.g. out of inotify watches: polling still works
            return
        self._observer, self.poll = observer, max(self.poll, 30.0)
        self.backend = f"filesystem events ({type(observer).__name__})"

    def files(self) -> list[Path]:
        walk = self.folder.rglob("*") if self.recursive else self.folder.iterdir()
        return sorted((p for p in walk if _supported(p) and p.is_file()), key=lambda p: str(p).lower())

    def ready(self) -> list[Path]:
        """Files unchanged for `settle` seconds and not handed out before in this state, in name order."""
        now, wall = time.monotonic(), time.time()
        seen: dict[Path, tuple[int, int, float]] = {}
        for p in self.files():
            try:
                st = p.stat()
            except OSError:  # deleted or renamed between the listing and now
                continue
            sig = (st.st_size, st.st_mtime_ns)
            prev = self._seen.get(p)
            if prev is not None and prev[:2] == sig:
                since = prev[2]
            else:
                # first sight or changed: unchanged since its mtime, as far as we can tell (a file that was already
                # complete when the watch started need not wait another `settle` seconds)
                since = now - max(0.0, wall - st.st_mtime_ns / 1e9) if prev is None else now
            seen[p] = (*sig, since)
        self._seen = seen
        out = [p for p, (size, mtime, since) in seen.items()
               if now - since >= self.settle and self._handed.get(p) != (size, mtime)]
        for p in out:
            self._handed[p] = seen[p][:2]
        return out

    def wait(self, stop: threading.Event | None = None) -> None:
        """Until the folder changes, a settling file may have become ready, the poll interval passed, or `stop`."""
        now = time.monotonic()
        timeout = self.poll
        for p, (size, mtime, since) in self._seen.items():
            if self._handed.get(p) != (size, mtime):
                timeout = min(timeout, max(0.05, since + self.settle - now))
        if stop is not None:
            # wake on either event: the stop flag's waiters are not ours, so poll it in short slices
            end = now + timeout
            while not stop.is_set() and not self._wake.is_set() and time.monotonic() < end:
                self._wake.wait(min(0.2, max(0.0, end - time.monotonic())))
        else:
            self._wake.wait(timeout)
        self._wake.clear()

    def close(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def __enter__(self) -> "FolderWatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_watch(watcher: FolderWatcher, process_fn: Callable[[BatchItem], dict[str, Any] | None], output_dir: str | Path,
              *, pattern: str, ext: str | None = None, stop: threading.Event,
              on_event: EventCallback | None = None) -> BatchSummary:
    """Restore every file the watcher hands out, as batches under the batch rules (`run_batch`: an existing output
    is skipped, a failure is reported and the watch goes on), until `stop` is set or an item is interrupted.

    Each group of files ready together is one batch with its own plan event; the per-batch summaries are combined
    into the one returned (and reported as a single summary event at the end).
    """
    total, index, t0 = BatchSummary(), 0, time.perf_counter()
    notify = on_event or (lambda _: None)

    def forward(event) -> None:
        if event.kind != "summary":
            notify(event)

    while not stop.is_set():
        items = []
        for path in watcher.ready():
            index += 1
            items.append(BatchItem(index, path, output_path(path, index, output_dir, pattern, ext)))
        if items:
            done = run_batch(items, process_fn, on_event=forward, stop=stop.is_set)
            total.done += done.done
            total.skipped += done.skipped
            total.failed += done.failed
            if done.interrupted:
                total.interrupted = True
                break
        watcher.wait(stop)
    notify(total.event(time.perf_counter() - t0))
    return total
