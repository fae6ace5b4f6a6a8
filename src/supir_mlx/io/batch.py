"""Batches of photos: collect inputs, plan outputs, run each item, survive failures and Ctrl-C, resume.

    items = plan_outputs(collect_inputs(["scans/"], recursive=True), "restored/")
    summary = run_batch(items, lambda item: restore_one(item.input, item.output))
    print(summary.line())

`process_fn(item)` must write `item.output` itself (atomically, e.g. with `io.images.save_image`); `run_batch`
never writes. A second run with the same plan skips every output that exists, so an interrupted batch resumes.
"""

from __future__ import annotations

import errno
import glob
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..events import Event, EventCallback
from .images import INPUT_EXTENSIONS, ImageError, _reason

DEFAULT_PATTERN = "{stem}_supir{ext}"


@dataclass(frozen=True)
class BatchItem:
    index: int  # 1-based position in the batch
    input: Path
    output: Path

    def tags(self) -> dict[str, Any]:
        """The fields that tie an event to this item (index, input, output)."""
        return {"index": self.index, "input": str(self.input), "output": str(self.output)}


@dataclass
class BatchSummary:
    done: list[BatchItem] = field(default_factory=list)
    skipped: list[tuple[BatchItem, str]] = field(default_factory=list)
    failed: list[tuple[BatchItem, str]] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # entries collect_inputs could not read
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted

    def line(self) -> str:
        n = len(self.skipped) + len(self.unreadable)
        why = f" ({len(self.unreadable)} unreadable)" if self.unreadable else ""
        s = f"{len(self.done)} done, {n} skipped{why}, {len(self.failed)} failed"
        return s + (" (interrupted: run the same command again to resume)" if self.interrupted else "")

    def event(self, seconds: float, **extra: Any) -> Event:
        return Event("summary", {"done": len(self.done), "skipped": len(self.skipped) + len(self.unreadable),
                                 "failed": len(self.failed),
                                 "interrupted": self.interrupted, "seconds": round(seconds, 3), **extra})


def _supported(p: Path) -> bool:
    return p.suffix.lower() in INPUT_EXTENSIONS and not p.name.startswith(".")


def _problem(p: Path) -> str | None:
    """Why an entry cannot be read as an image file: "" when it can, None for a folder."""
    try:
        st = p.stat()
    except FileNotFoundError:
        if p.is_symlink():
            return f"broken symbolic link (its target {os.readlink(p)} does not exist)"
        return "vanished while the folder was read"
    except OSError as e:
        return "symbolic link loop" if e.errno == errno.ELOOP else f"cannot be read ({_reason(e)})"
    if stat.S_ISDIR(st.st_mode):
        return None
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a pipe, socket or device)"
    if not os.access(p, os.R_OK):
        return "cannot be read (permission denied)"
    return ""


def _scan(folder: Path, recursive: bool, skipped: list[tuple[Path, str]]) -> Iterator[Path]:
    """Readable image files in `folder` (and, recursively, in sub-folders; symbolic links to folders are not
    followed, so a link cycle cannot loop); what cannot be read goes to `skipped`."""
    try:
        entries = list(os.scandir(folder))
    except OSError as e:
        skipped.append((folder, f"folder cannot be read ({_reason(e)})"))
        return
    for e in entries:
        p = Path(e.path)
        if recursive and e.is_dir(follow_symlinks=False):
            yield from _scan(p, recursive, skipped)
        elif _supported(p):
            problem = _problem(p)
            if problem:
                skipped.append((p, problem))
            elif problem == "":
                yield p


def collect_inputs(sources: Iterable[str | Path], recursive: bool = False,
                   skipped: list[tuple[Path, str]] | None = None) -> list[Path]:
    """Files, folders (optionally recursive) and glob patterns -> supported image files, deduplicated, in order.

    A path that does not exist (and matches nothing as a glob) is an ImageError; so is a named file with an
    unsupported extension. Files inside folders with other extensions are left out. Entries with an image
    extension that cannot be read (a broken symbolic link, a link loop, a pipe or device, no permission, a folder
    that cannot be listed) are appended to `skipped` as (path, reason), to be reported, never dropped silently.
    """
    skipped = skipped if skipped is not None else []
    found: list[Path] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            found += sorted(_scan(p, recursive, skipped), key=lambda q: str(q).lower())
        elif p.is_file():
            if not _supported(p):
                raise ImageError(f"{p}: unsupported file type {p.suffix or '(none)'} "
                                 f"(supported: {', '.join(sorted(INPUT_EXTENSIONS))})")
            found.append(p)
        elif glob.has_magic(str(src)):
            matches = [Path(m) for m in sorted(glob.glob(str(src), recursive=recursive))]
            for m in matches:
                if _supported(m) and (problem := _problem(m)) is not None:
                    if problem:
                        skipped.append((m, problem))
                    else:
                        found.append(m)
            if not matches:
                raise ImageError(f"{src}: no files match this pattern")
        elif os.path.lexists(p):  # there, but not readable: a broken or looping link, a pipe
            raise ImageError(f"{p}: {_problem(p)}")
        else:
            raise ImageError(f"{p}: no such file or folder")
    seen, unique = set(), []
    for f in found:
        key = os.path.realpath(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def plan_outputs(inputs: list[Path], output_dir: str | Path | None = None, pattern: str = DEFAULT_PATTERN,
                 ext: str | None = None) -> list[BatchItem]:
    """One output path per input from `pattern` ({stem}, {ext}, {parent}, {index}; e.g. "{stem}_supir{ext}").

    `output_dir` None puts each output next to its input. `ext` (".png", ".tif" ...) replaces the input's. An
    output that would equal an input, or another output, is refused with an ImageError rather than overwrite it.
    """
    items, taken = [], {os.path.realpath(p) for p in inputs}
    outs: set[str] = set()
    for i, src in enumerate(inputs, 1):
        out = output_path(src, i, output_dir, pattern, ext)
        key = os.path.realpath(out)
        if key in taken:
            raise ImageError(f"{src}: output {out} would overwrite an input; choose another pattern or folder")
        if key in outs:
            raise ImageError(f"{src}: output {out} is also the output of another input; add {{parent}} or "
                             "{index} to the pattern")
        outs.add(key)
        items.append(BatchItem(i, src, out))
    return items


def output_path(src: Path, index: int, output_dir: str | Path | None = None, pattern: str = DEFAULT_PATTERN,
                ext: str | None = None) -> Path:
    """The output `plan_outputs` gives input number `index` (1-based), without its collision checks."""
    try:
        name = pattern.format(stem=src.stem, ext=ext or src.suffix, parent=src.parent.name, index=index)
    except (KeyError, IndexError, ValueError) as e:
        raise ImageError(f"output pattern {pattern!r}: unknown placeholder {e} "
                         "(use {stem}, {ext}, {parent}, {index})") from None
    if not Path(name).suffix:
        name += ext or src.suffix
    return (Path(output_dir) if output_dir is not None else src.parent) / name


def drop_earlier_outputs(inputs: list[Path], output_dir: str | Path | None = None, pattern: str = DEFAULT_PATTERN,
                         ext: str | None = None, *, keep: Iterable[str | Path] = (),
                         variants: Callable[[Path], Iterable[Path]] = lambda p: ()) -> list[Path]:
    """`inputs` without the files an earlier run of the same plan wrote (outputs and their `variants`).

    When outputs go next to their inputs, a folder or glob picks up last run's `photo_supir.png`: restoring it
    again (or refusing the whole batch because its name is an output) would make resuming impossible. Files in
    `keep` (the ones the user named explicitly) are never dropped.
    """
    kept = {os.path.realpath(p) for p in keep}
    derived: set[str] = set()
    for i, src in enumerate(inputs, 1):
        out = output_path(src, i, output_dir, pattern, ext)
        derived.update(os.path.realpath(p) for p in (out, *variants(out)))
    return [p for p in inputs if os.path.realpath(p) in kept or os.path.realpath(p) not in derived]


def run_batch(items: list[BatchItem], process_fn: Callable[[BatchItem], dict[str, Any] | None], *,
              overwrite: bool = False, on_event: EventCallback | None = None,
              stop: Callable[[], bool] | None = None,
              unreadable: Iterable[tuple[Path, str]] = ()) -> BatchSummary:
    """Run `process_fn` on each item; one failure never stops the others.

    Existing outputs are skipped unless `overwrite` (that is how a second run resumes). An exception from
    `process_fn` is recorded as a one-line reason and the batch goes on. Ctrl-C stops after the current item has
    been abandoned (the atomic writer leaves no partial file) and returns the summary with `interrupted` set.
    `on_event` receives the batch's events (supir_mlx.events): plan, then per item start and result, skipped or
    error, then summary; each of `unreadable` (collect_inputs' `skipped`) is a skipped event (index 0, no output)
    right after the plan, and counts as skipped. What `process_fn` returns (outputs, peak_bytes, caption,
    provenance) goes into the item's result event. `stop()` true before an item ends the batch there, as an
    interruption (a watch stopping after the image in progress).
    """
    summary = BatchSummary()
    notify = on_event or (lambda _: None)
    t_batch = time.perf_counter()
    notify(Event("plan", {"count": len(items), "items": [it.tags() for it in items]}))
    for path, reason in unreadable:
        summary.unreadable.append((path, reason))
        notify(Event("skipped", {"index": 0, "input": str(path), "output": None, "reason": reason}))
    for item in items:
        if stop is not None and stop():
            summary.interrupted = True
            break
        if item.output.exists() and not overwrite:
            summary.skipped.append((item, "output exists"))
            notify(Event("skipped", {**item.tags(), "reason": "output exists"}))
            continue
        notify(Event("start", item.tags()))
        t0 = time.perf_counter()
        try:
            try:
                item.output.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ImageError(f"{item.output}: cannot create the output folder {item.output.parent} "
                                 f"({_reason(e)})") from None
            returned = process_fn(item) or {}
        except KeyboardInterrupt:
            summary.interrupted = True
            break
        except Exception as e:  # noqa: BLE001 - any failure of one photo must not stop the batch
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            if not isinstance(e, ImageError):
                reason = f"{item.input}: {reason}"
            summary.failed.append((item, reason))
            notify(Event("error", {**item.tags(), "message": reason}))
            continue
        summary.done.append(item)
        notify(Event("result", {**item.tags(), "outputs": [str(item.output)], "seconds": round(time.perf_counter() - t0, 3),
                                "peak_bytes": 0, "caption": "", "provenance": {}, **returned}))
    notify(summary.event(time.perf_counter() - t_batch))
    return summary
