"""The Studio's engine: photos, a queue of jobs run one at a time on one warm `Restorer`, and events.

It knows nothing of HTTP (server.py is the web layer over it), so every rule lives here once: uploads are decoded
with the CLI's checks, names never become paths, one worker thread runs one job at a time, Cancel raises from the
sampler's per-step callback, results are saved with the CLI's names and writer, and every listener (each open
tab) receives the same events.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from ..io.batch import DEFAULT_PATTERN, BatchItem, collect_inputs, output_path
from ..io.images import INPUT_EXTENSIONS, ImageError, load_image
from ..pipeline.settings import COLOR_FIXES, MODELS, SAMPLERS, RestoreSettings, SettingsError, settings_for
from .preview import fit_projection, project

CHOICES = {"sampler": SAMPLERS, "color_fix": COLOR_FIXES, "model": MODELS}
OUTPUT_FORMATS = {"png": ".png", "tif": ".tif", "jpg": ".jpg", "webp": ".webp"}
ESTIMATE_STAGES = ("caption", "stage1", "condition", "sample", "decode")


class StudioError(ValueError):
    """A request the Studio refuses; str() is one plain sentence for the page."""


class JobCancelled(Exception):
    """Raised from the progress callback: the sampler stops within one step."""


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text if text and "\n" not in text else (text.splitlines()[0] if text else type(e).__name__)


def safe_name(name: str) -> str:
    """A photo's display name: a bare file name with an image extension. Anything path-like is refused, so a
    name can never steer a read or a write (files are stored under the Studio's own ids)."""
    if (not name or len(name) > 200 or any(c in name for c in "/\\\0:") or name.startswith(".")
            or any(ord(c) < 32 for c in name) or Path(name).name != name):
        raise StudioError(f"the file name {name[:80]!r} is not allowed (a plain file name, no folders)")
    if Path(name).suffix.lower() not in INPUT_EXTENSIONS:
        raise StudioError(f"{name}: unsupported file type (supported: {', '.join(sorted(INPUT_EXTENSIONS))})")
    return name


def knob_schema() -> list[dict[str, Any]]:
    """Every setting the CLI exposes, with its type and choices, for the page's advanced panel."""
    out = []
    for f in fields(RestoreSettings):
        if f.name == "prompt":
            continue  # the caption has its own editor
        kind = str(f.type).split(" |")[0]
        out.append({"name": f.name, "type": "choice" if f.name in CHOICES else kind, "default": f.default,
                    "optional": "None" in str(f.type), "choices": list(CHOICES.get(f.name, ()))})
    return out


def parse_settings(preset: str, given: dict[str, Any], caption: str | None) -> RestoreSettings:
    """The page's preset + edited knobs + caption -> validated settings, or one sentence naming the bad knob."""
    if not isinstance(given, dict):
        raise StudioError("settings must be an object of knob names and values")
    types = {k["name"]: k for k in knob_schema()}
    values: dict[str, Any] = {}
    for name, v in given.items():
        k = types.get(name)
        if k is None:
            raise StudioError(f"unknown setting '{name}'")
        if v is None or v == "":
            if not k["optional"]:
                raise StudioError(f"{name} needs a value")
            continue
        try:
            if k["type"] == "bool":
                if not isinstance(v, bool):
                    raise TypeError
            elif k["type"] == "int":
                if isinstance(v, bool) or float(v) != int(float(v)):
                    raise TypeError
                v = int(float(v))
            elif k["type"] == "float":
                if isinstance(v, bool):
                    raise TypeError
                v = float(v)
                if not math.isfinite(v):
                    raise TypeError
            elif not isinstance(v, str):
                raise TypeError
        except (TypeError, ValueError, OverflowError):
            raise StudioError(f"{name} must be {'a finite number' if k['type'] == 'float' else 'a whole number' if k['type'] == 'int' else 'on or off' if k['type'] == 'bool' else 'text'}, not {str(v)[:40]!r}") from None
        values[name] = v
    if caption is not None and not isinstance(caption, str):
        raise StudioError("the caption must be text")
    try:
        return settings_for(str(preset), **values, prompt=caption)
    except SettingsError as e:
        raise StudioError(str(e)) from None


@dataclass
class Photo:
    id: str
    name: str  # a safe bare file name: what the page shows and the stem of the output names
    path: Path  # the user's FOLDER or the Studio's upload folder; never derived from a request
    width: int
    height: int
    caption_state: str = "none"  # none | pending | done | failed | unavailable
    suggestion: str | None = None  # LLaVA's caption of the stage-1 image
    caption_error: str | None = None

    def box(self, settings: RestoreSettings, draft: bool) -> tuple[int, int, int, int]:
        """The part of the photo a restore works on: all of it, or the draft's centred crop (as `restore --draft`)."""
        from ..pipeline.restore import draft_box

        return draft_box(self.width, self.height, settings) if draft else (0, 0, self.width, self.height)

    def size(self, settings: RestoreSettings, draft: bool) -> tuple[int, int]:
        left, top, right, bottom = self.box(settings, draft)
        return right - left, bottom - top

    def load(self, settings: RestoreSettings, draft: bool):
        from dataclasses import replace

        loaded = load_image(self.path)
        if not draft:
            return loaded
        left, top, right, bottom = self.box(settings, draft)
        return replace(loaded, rgb=loaded.rgb[top:bottom, left:right],
                       alpha=None if loaded.alpha is None else loaded.alpha[top:bottom, left:right])

    def to_json(self, jobs: list["Job"]) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "width": self.width, "height": self.height,
                "caption_state": self.caption_state, "suggestion": self.suggestion, "caption_error": self.caption_error,
                "results": [j.id for j in jobs if j.photo_id == self.id and j.kind == "restore" and j.result is not None]}


@dataclass
class Job:
    id: str
    photo_id: str
    kind: str  # "restore" or "caption"
    settings: RestoreSettings
    preset: str = "default"
    draft: bool = False  # restore only the centred crop of about one 1024-px tile, saved as <name>_draft
    state: str = "queued"  # queued | running | done | failed | cancelled
    stage: str = ""
    done: int = 0
    total: int = 0
    started: float = 0.0
    stage_started: float = 0.0
    seconds: float = 0.0
    eta: float | None = None
    message: str | None = None
    result: Any = None  # RestoreResult
    provenance: dict | None = None
    saved: list[str] = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)
    preview: Any = None  # the latest preview frame (PIL image at latent resolution)
    stage1: Any = None  # the stage-1 image (PIL, output size) as soon as stage 1 ends
    previews: int = 0  # number of preview frames published so far
    first_preview: float | None = None  # seconds from the start of the job to its first preview frame

    def to_json(self) -> dict[str, Any]:
        running = self.state == "running"
        return {"id": self.id, "photo": self.photo_id, "kind": self.kind, "preset": self.preset, "draft": self.draft,
                "state": self.state,
                "stage": self.stage, "done": self.done, "total": self.total,
                "elapsed": round(time.perf_counter() - self.started if running else self.seconds, 2),
                "eta": None if self.eta is None else round(self.eta, 1), "message": self.message,
                "first_preview": None if self.first_preview is None else round(self.first_preview, 3),
                "has_stage1": self.stage1 is not None,
                "settings": self.settings.to_dict(), "caption": self.result.caption if self.result else None,
                "provenance": self.provenance, "saved": self.saved, "previews": self.previews,
                "peak_gb": round(self.result.peak_memory / 1e9, 3) if self.result else None,
                "size": list(self.result.image.size) if self.result else None}


class Studio:
    """State + one worker thread. `load()` builds the Restorer (in the worker, so the page is up at once and a
    missing-weights error is shown there); `listen(fn)` registers a callback for every event."""

    def __init__(self, load: Callable[[], Any], out_dir: Path, work_dir: Path, folder: Path | None = None,
                 max_upload_bytes: int = 200_000_000, caption_size: int = RestoreSettings.caption_size,
                 credentials=None):
        """`caption_size`: short side of the stage-1 image LLaVA is shown for a photo's suggested caption;
        `credentials`: the Content Credentials signer Save uses (io.credentials, as `restore` builds it), or None."""
        self._load = load
        self.out_dir, self.folder = Path(out_dir), folder
        self.uploads = Path(work_dir) / "uploads"
        self.uploads.mkdir(parents=True, exist_ok=True)
        self.max_upload_bytes = max_upload_bytes
        self.credentials = credentials
        self.caption_settings = RestoreSettings(caption_size=caption_size).validate()
        self.restorer = None
        self.model_state, self.model_error = "loading", None
        self.photos: dict[str, Photo] = {}
        self.jobs: dict[str, Job] = {}
        # per stage: (fixed seconds, seconds per work unit), from the warm-up's two sizes, then each real run
        self.rates: dict[str, tuple[float, float]] = {}
        self.projection = None  # latent -> RGB map for the live preview (preview.fit_projection)
        self._listeners: list[Callable[[dict], None]] = []
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="studio-worker", daemon=True)
        self.folder_errors: list[str] = []
        if folder is not None:
            self._add_folder(folder)

    # ------------------------------------------------------------------------------------ lifecycle
    def start(self) -> "Studio":
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        with self._wake:
            self._stopping = True
            for j in self.jobs.values():
                j.cancel.set()
            self._wake.notify_all()
        self._thread.join(timeout)

    def listen(self, fn: Callable[[dict], None]) -> Callable[[], None]:
        with self._lock:
            self._listeners.append(fn)
        return lambda: self._unlisten(fn)

    def _unlisten(self, fn) -> None:
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def _publish(self, event: dict) -> None:
        for fn in list(self._listeners):
            try:
                fn(event)
            except Exception:  # noqa: BLE001 - a closed tab must not stop the others or the job
                self._unlisten(fn)

    def _changed(self) -> None:
        self._publish({"type": "state", "state": self.snapshot()})

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            jobs = list(self.jobs.values())
            r = self.restorer
            return {
                "model": {"state": self.model_state, "error": self.model_error,
                          "captioner": bool(r is not None and r.captioner_path is not None),
                          "description": getattr(r, "description", {}) if r is not None else {}},
                "out_dir": str(self.out_dir), "folder": str(self.folder) if self.folder else None,
                "folder_errors": self.folder_errors,
                "photos": [p.to_json(jobs) for p in self.photos.values()],
                "jobs": [j.to_json() for j in jobs],
            }

    # --------------------------------------------------------------------------------------- photos
    def _add_folder(self, folder: Path) -> None:
        try:
            paths = collect_inputs([folder])
        except ImageError as e:
            raise StudioError(str(e)) from None
        for p in paths:
            try:
                self._register(p.name, p)
            except (ImageError, StudioError) as e:
                self.folder_errors.append(one_line(e))

    def _register(self, name: str, path: Path) -> Photo:
        loaded = load_image(path)  # the CLI's checks: pixel limit before decoding, one-line errors
        w, h = loaded.size
        photo = Photo(secrets.token_hex(6), name, path, w, h)
        with self._wake:
            self.photos[photo.id] = photo
            if self.model_state != "failed" and (self.restorer is None or self.restorer.captioner_path is not None):
                photo.caption_state = "pending"
                self._enqueue(Job(secrets.token_hex(6), photo.id, "caption", self.caption_settings))
            else:
                photo.caption_state = "unavailable"
        self._changed()
        return photo

    def add_upload(self, name: str, chunks) -> Photo:
        """Store an upload under a fresh id (never its name), refuse it past the size limit, decode it with the
        CLI's checks; a bad file leaves nothing behind and raises StudioError with one sentence."""
        name = safe_name(name)
        pid = secrets.token_hex(8)
        path = self.uploads / f"{pid}{Path(name).suffix.lower()}"
        size = 0
        try:
            with open(path, "wb") as f:
                for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_upload_bytes:
                        raise StudioError(f"{name}: larger than the upload limit of {self.max_upload_bytes / 1e6:.0f} MB")
                    f.write(chunk)
            if size == 0:
                raise StudioError(f"{name}: empty file (0 bytes)")
            return self._register(name, path)
        except ImageError as e:
            path.unlink(missing_ok=True)
            raise StudioError(str(e).replace(str(path), name)) from None
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    def photo(self, pid: str) -> Photo:
        p = self.photos.get(pid)
        if p is None:
            raise StudioError("no such photo (it may belong to an earlier session)")
        return p

    def job(self, jid: str) -> Job:
        j = self.jobs.get(jid)
        if j is None:
            raise StudioError("no such job")
        return j

    # ----------------------------------------------------------------------------------- planning
    def plan(self, pid: str, settings: RestoreSettings, draft: bool = False) -> dict[str, Any]:
        """The memory plan and a time estimate for restoring photo `pid` (or its draft crop) with `settings`."""
        from ..memory import MemoryPlanError

        photo = self.photo(pid)
        r = self.restorer
        if r is None:
            return {"plan": None, "fits": None, "estimate": None,
                    "message": self.model_error or "the model is still loading"}
        try:
            p = r.plan(*photo.size(settings, draft), settings)
        except MemoryPlanError as e:
            return {"plan": None, "fits": False, "estimate": None, "message": f"{photo.name} cannot fit in memory: {one_line(e)}"}
        caption = settings.prompt is None and r.captioner_path is not None and photo.suggestion is None
        return {"plan": str(p), "fits": p.fits, "estimate": self._estimate(p.width, p.height, settings, caption),
                "message": None}

    def _units(self, width: int, height: int, s: RestoreSettings) -> dict[str, float]:
        f = self.restorer.config.vae.downsample_factor
        mp = width * height / 1e6
        return {"caption": 1.0, "stage1": mp, "condition": 1.0,
                "sample": s.steps * s.num_samples * (width // f) * (height // f) / 1e4, "decode": mp * s.num_samples}

    def _seconds(self, stage: str, units: float) -> float:
        fixed, per_unit = self.rates.get(stage, (0.0, 0.0))
        return fixed + per_unit * units

    def _estimate(self, width: int, height: int, s: RestoreSettings, caption: bool) -> float | None:
        if not self.rates:
            return None
        units = self._units(width, height, s)
        return round(sum(self._seconds(k, units[k]) for k in ESTIMATE_STAGES if k != "caption" or caption), 1)

    def _learn(self, width: int, height: int, s: RestoreSettings, stages: dict) -> None:
        """A run's stage times: the per-unit cost is refitted, the fixed cost (from the warm-up) kept."""
        units = self._units(width, height, s)
        for name, st in stages.items():
            if name in units and units[name] > 0:
                fixed, _ = self.rates.get(name, (0.0, 0.0))
                fixed = min(fixed, st.seconds)
                self.rates[name] = (fixed, (st.seconds - fixed) / units[name])

    # --------------------------------------------------------------------------------------- jobs
    def submit(self, pid: str, settings: RestoreSettings, preset: str = "default", draft: bool = False) -> Job:
        photo = self.photo(pid)
        if self.model_state == "failed":
            raise StudioError(self.model_error)
        job = Job(secrets.token_hex(6), photo.id, "restore", settings, preset, bool(draft))
        with self._wake:
            self._enqueue(job)
        self._changed()
        return job

    def _enqueue(self, job: Job) -> None:
        self.jobs[job.id] = job
        self._wake.notify_all()

    def cancel(self, jid: str) -> Job:
        job = self.job(jid)
        with self._lock:
            if job.state == "queued":
                job.state, job.message = "cancelled", "cancelled before it started"
            job.cancel.set()
        self._changed()
        return job

    def _next(self) -> Job | None:
        with self._wake:
            while not self._stopping:
                queued = [j for j in self.jobs.values() if j.state == "queued"]
                if queued and self.model_state != "loading":
                    queued[0].state = "running"
                    return queued[0]
                self._wake.wait()
        return None

    def _work(self) -> None:
        import mlx.core as mx

        try:
            self._load_model()
            while (job := self._next()) is not None:
                self._execute(job)
        finally:
            mx.clear_streams()  # MLX's advice for threads: without it the process can abort at exit

    def _load_model(self) -> None:
        try:
            r = self.restorer = self._load()
            self._warm_up(r)
            with self._lock:
                self.model_state = "ready"
                if r.captioner_path is None:
                    for j in [j for j in self.jobs.values() if j.kind == "caption"]:
                        del self.jobs[j.id]
                        self.photos[j.photo_id].caption_state = "unavailable"
        except Exception as e:  # noqa: BLE001 - shown on the page; the server keeps running
            with self._lock:
                self.model_state, self.model_error = "failed", one_line(e)
                for j in self.jobs.values():
                    if j.state == "queued":
                        j.state, j.message = "failed", self.model_error
                for p in self.photos.values():
                    if p.caption_state == "pending":
                        p.caption_state = "unavailable"
        with self._wake:
            self._wake.notify_all()
        self._changed()

    def _warm_up(self, restorer) -> None:
        """Two tiny restores (64 and 128 px, one step): they compile what the first real run would, and give each
        stage's time a fixed part and a per-unit part, so that the first estimates do not scale the small runs'
        overhead up to a full-size photo."""
        import numpy as np

        runs = []
        for side in (64, 128):
            ramp = np.linspace(0, 255, side, dtype=np.float32)
            img = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, 255 - ramp) / 2,
                            np.tile(ramp, (side, 1))], -1).astype(np.uint8)
            s = settings_for(steps=1, min_size=side, prompt="")
            runs.append((self._units(side, side, s), restorer.restore(img, s).stages))
        (u1, t1), (u2, t2) = runs
        for name in t2:
            if name in u2:
                a, b = t1[name].seconds, t2[name].seconds
                slope = (b - a) / (u2[name] - u1[name]) if u2[name] > u1[name] and b > a else b / u2[name]
                self.rates[name] = (max(0.0, b - slope * u2[name]), slope)
        self.projection = fit_projection(restorer.runner)
        self._release()

    def _execute(self, job: Job) -> None:
        photo = self.photos[job.photo_id]
        job.started = job.stage_started = time.perf_counter()
        self._changed()
        try:
            if job.cancel.is_set():
                raise JobCancelled
            if self.model_state == "failed":
                raise StudioError(self.model_error)
            if job.kind == "caption":
                self._caption(job, photo)
            else:
                self._restore(job, photo)
            job.state = "done"
        except JobCancelled:
            job.state, job.message = "cancelled", f"cancelled during {job.stage or 'start-up'}"
        except Exception as e:  # noqa: BLE001 - one job's failure is one sentence, never the server's end
            from ..memory import MemoryPlanError

            msg = one_line(e).replace(str(photo.path), photo.name)
            if isinstance(e, MemoryPlanError):
                msg = f"{photo.name} cannot fit in memory: {msg}"
            job.state, job.message = "failed", msg
            if job.kind == "caption":
                photo.caption_state, photo.caption_error = "failed", msg
        finally:
            job.seconds = time.perf_counter() - job.started
            job.eta = None
            if job.kind == "caption":  # a finished caption job lives on as the photo's suggestion
                self.jobs.pop(job.id, None)
            self._release()
            self._changed()

    def _release(self) -> None:
        from ..memory import release_freed

        release_freed()

    def _caption(self, job: Job, photo: Photo) -> None:
        job.stage = "caption"
        photo.suggestion = self.restorer.caption(load_image(photo.path).to_pil(), job.settings,
                                                 staged=self.restorer.plan(photo.width, photo.height).staged)
        photo.caption_state = "done"
        self.rates["caption"] = (time.perf_counter() - job.started, 0.0)

    def _restore(self, job: Job, photo: Photo) -> None:
        import numpy as np
        from PIL import Image

        from ..io.metadata import make_provenance
        from ..pipeline.preprocess import processing_size, tensor_to_image

        s = job.settings
        loaded = photo.load(s, job.draft)
        r = self.restorer
        plan = r.plan(*loaded.size, s)  # a photo that cannot fit fails here, before any work
        units = self._units(plan.width, plan.height, s)
        _, _, h0, w0 = processing_size(*loaded.size, s.upscale, s.min_size)
        later = {"caption": ("stage1", "condition", "sample", "decode"), "stage1": ("condition", "sample", "decode"),
                 "condition": ("sample", "decode"), "sample": ("decode",), "decode": ()}

        def on_event(ev) -> None:
            """Stage events after every unit of work (each tile of each step), step events after each step:
            Cancel raises here, so the sampler stops within one step (within one tile when tiled)."""
            if job.cancel.is_set():
                raise JobCancelled
            if ev.kind == "stage":
                if ev.image is not None:
                    job.stage1 = Image.fromarray(tensor_to_image(np.array(ev.image[0]), h0, w0))
                    self._publish({"type": "stage1", "job": job.id})
                job.stage, job.done, job.total = ev["stage"], ev["done"], ev["total"]
                left = ev["time_left"] if ev["time_left"] is not None else self._seconds(job.stage, units.get(job.stage, 0))
                job.eta = left + sum(self._seconds(k, units[k]) for k in later.get(job.stage, ()))
                self._publish({"type": "progress", "job": job.to_json()})
            elif ev.kind == "step" and ev.denoised is not None and self.projection is not None:
                job.preview = project(ev.denoised, self.projection)
                job.previews += 1
                if job.first_preview is None:
                    job.first_preview = time.perf_counter() - job.started
                self._publish({"type": "preview", "job": job.id, "n": job.previews})

        job.stage = "starting"
        self._publish({"type": "progress", "job": job.to_json()})
        result = r.restore(loaded.to_pil(), s, on_event=on_event)
        self._learn(plan.width, plan.height, s, result.stages)
        desc = r.description
        job.provenance = make_provenance(
            {**s.to_dict(), "prompt": result.caption}, model=desc.get("model", f"SUPIR-{s.model}"),
            base_checkpoint=desc.get("base_checkpoint", ", ".join(desc.get("sources", [])) or "unknown"),
            caption=result.caption, seed=s.seed, source=photo.name)
        job.result = result

    # --------------------------------------------------------------------------------------- save
    def save(self, jid: str, fmt: str | None = None, bits: int | None = None, jpeg_quality: int = 95,
             overwrite: bool = False, fidelity_map: bool = False) -> Path:
        """Write a result into OUT exactly as `restore -o OUT` names and writes it (atomic, metadata, bits)."""
        from ..cli.restore import _save

        job = self.job(jid)
        if job.result is None:
            raise StudioError("this job has no result to save")
        if fmt is not None and fmt not in OUTPUT_FORMATS:
            raise StudioError(f"format must be one of {', '.join(OUTPUT_FORMATS)}, not {str(fmt)[:20]!r}")
        if bits not in (None, 8, 16) or not (isinstance(jpeg_quality, int) and 1 <= jpeg_quality <= 100):
            raise StudioError("bits must be 8 or 16 and the JPEG quality 1-100")
        photo = self.photos[job.photo_id]
        pattern = DEFAULT_PATTERN.replace("{ext}", "_draft{ext}") if job.draft else DEFAULT_PATTERN  # as --draft
        out = output_path(Path(photo.name), 1, self.out_dir, pattern, OUTPUT_FORMATS.get(fmt) if fmt else None)
        if out.resolve().parent != self.out_dir.resolve():  # names are checked on the way in; this is the backstop
            raise StudioError(f"{out.name}: refusing to write outside {self.out_dir}")
        if out.exists() and not overwrite:
            raise StudioError(f"{out.name} already exists in {self.out_dir}; tick 'replace' to overwrite it")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            _save(BatchItem(1, Path(photo.name), out), photo.load(job.settings, job.draft), job.result, self.restorer,
                  str(bits) if bits else None, fmt, jpeg_quality, overwrite, False, fidelity_map=fidelity_map,
                  credentials=self.credentials, preset=job.preset, ingredient=photo.path)
        except ImageError as e:
            raise StudioError(one_line(e)) from None
        job.saved.append(out.name)
        self._changed()
        return out
