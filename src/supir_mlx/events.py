"""Progress and results as events: one stream for the Python API, batches, `restore --json`, `watch` and the Studio.

    def show(event):
        print(event.kind, event.to_dict())
        if event.kind == "step" and event.denoised is not None:
            preview(event.denoised)             # the step's x0 estimate, an MLX latent (never serialised)

    restorer.restore("photo.jpg", on_event=show)                # stage and step events of one image
    run_batch(items, process, on_event=show)                    # plan, start, skipped, result, error, summary

`SCHEMA` is the stable contract (README, "Events"): every event serialises to one JSON object whose `event` names
its kind, `time` is Unix seconds, and the fields of its kind follow. Fields may be added in later versions, never
renamed or removed. Item-level events of a batch also carry `index` and `input`; distributed runs add `rank`.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

# kind -> {field: JSON types}: the fields every event of that kind carries ("null" marks values that may be null).
SCHEMA: dict[str, dict[str, tuple[str, ...]]] = {
    "plan": {"count": ("int",), "items": ("list",)},
    "start": {"index": ("int",), "input": ("str",), "output": ("str",)},
    "stage": {"stage": ("str",), "done": ("int",), "total": ("int",), "elapsed": ("float",),
              "time_left": ("float", "null")},
    "step": {"step": ("int",), "steps": ("int",), "sigma": ("float",), "tiles": ("int",), "elapsed": ("float",),
             "time_left": ("float",)},
    "result": {"index": ("int",), "input": ("str",), "output": ("str",), "outputs": ("list",),
               "seconds": ("float",), "peak_bytes": ("int",), "caption": ("str",), "provenance": ("dict",)},
    "skipped": {"index": ("int",), "input": ("str",), "output": ("str", "null"), "reason": ("str",)},
    "error": {"message": ("str",)},
    "summary": {"done": ("int",), "skipped": ("int",), "failed": ("int",), "interrupted": ("bool",),
                "seconds": ("float",)},
}
# Fields any event may carry: every event has `event` and `time`; the rest depend on the context.
COMMON: dict[str, tuple[str, ...]] = {
    "event": ("str",), "time": ("float",), "rank": ("int",), "ranks": ("int",), "index": ("int",),
    "input": ("str",), "output": ("str", "null"),
}
# Stage names of one restore, in order ("caption" only when LLaVA captions the image).
STAGES = ("caption", "stage1", "condition", "sample", "decode")


@dataclass
class Event:
    """One event: `kind` (a SCHEMA key) and its JSON fields; step events (and the end of stage 1) also carry
    tensors for Python callbacks (a live preview), which `to_dict` / `to_json` leave out."""

    kind: str
    fields: dict[str, Any]
    time: float = field(default_factory=time.time)
    latent: Any = None  # step: the latent after this step (mx.array NHWC float32, the whole image's latent)
    denoised: Any = None  # step: this step's denoised estimate x0 (same shape); decode it for a preview
    image: Any = None  # stage "stage1" at done == total: the stage-1 image (mx.array NHWC float32 in [-1, 1])

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def with_fields(self, **extra: Any) -> "Event":
        return Event(self.kind, {**self.fields, **extra}, self.time, self.latent, self.denoised, self.image)

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.kind, "time": round(self.time, 3), **self.fields}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"), default=str)


EventCallback = Callable[[Event], None]


def tagged(callback: EventCallback | None, **extra: Any) -> EventCallback | None:
    """`callback` adding `extra` fields (a batch item's index and input, a rank) to every event it receives."""
    if callback is None or not extra:
        return callback
    return lambda e: callback(e.with_fields(**{k: v for k, v in extra.items() if k not in e.fields}))


class JsonLines:
    """An event callback writing each event as one JSON line (stdout by default), one write per line so lines
    from several processes sharing a pipe (ranks under mlx.launch) never interleave mid-line."""

    def __init__(self, stream=None, **extra: Any):
        self.stream, self.extra = stream, extra
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        stream = self.stream or sys.stdout
        line = event.with_fields(**self.extra).to_json() + "\n"
        with self._lock:
            stream.write(line)
            stream.flush()


class StageClock:
    """Turns `(stage, done, total)` work counts into stage events with elapsed time and time left."""

    def __init__(self, callback: EventCallback | None):
        self.callback = callback
        self.stage, self.t0 = None, 0.0

    def __call__(self, stage: str, done: int, total: int, image: Any = None) -> None:
        if self.callback is None:
            return
        now = time.perf_counter()
        if stage != self.stage:
            self.stage, self.t0 = stage, now
        elapsed = now - self.t0
        left = elapsed / done * (total - done) if done else None
        self.callback(Event("stage", {"stage": stage, "done": done, "total": total, "elapsed": round(elapsed, 3),
                                      "time_left": None if left is None else round(left, 3)}, image=image))


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "str"
    if isinstance(v, list):
        return "list"
    if isinstance(v, dict):
        return "dict"
    return type(v).__name__


def check(event: dict[str, Any]) -> list[str]:
    """What is wrong with one decoded JSON event against SCHEMA (empty when it conforms). An int is accepted
    where a float is documented (JSON does not tell 3.0 from 3)."""
    kind = event.get("event")
    if kind not in SCHEMA:
        return [f"unknown event kind {kind!r}"]
    problems = [f"{kind}: undocumented field {k}" for k in event if k not in COMMON and k not in SCHEMA[kind]]
    wanted = SCHEMA[kind]
    for name, types in {**COMMON, **wanted}.items():
        if name not in event:
            if name in wanted or name in ("event", "time"):
                problems.append(f"{kind}: missing {name}")
            continue
        t = _json_type(event[name])
        if t not in types and not (t == "int" and "float" in types):
            problems.append(f"{kind}.{name}: {t}, documented as {'|'.join(types)}")
    return problems
