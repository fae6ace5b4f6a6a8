"""Conformance runner: replays the official implementation's fixtures against our MLX code.

A reference directory holds one folder per group (`vae/`, `unet/`, ...) of safetensors fixtures, a README
with the suggested relative tolerance per group, and `tiny/` with the model (config.json + checkpoint)
the network fixtures were made with. Each group is handled by `supir_mlx.conformance.groups.<group>`,
a module with `run(fixture, ctx) -> list[Comparison]`; a group without a handler reports
"not implemented".
"""

from __future__ import annotations

import ast
import functools
import importlib
import json
import math
import re
import traceback
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

# Fallbacks when a directory's README does not state a group's tolerance (values of the shipped README).
DEFAULT_RTOL = {
    "vae": 1e-4,
    "text": 1e-4,
    "control": 1e-4,
    "unet": 1e-4,
    "denoiser": 1e-4,
    "sigmas": 1e-6,
    "sampler": 1e-3,
    "tiled_sampler": 1e-3,
    "colorfix": 1e-5,
    "pipeline": 1e-3,
    "preprocess": 0.0,
    "tilevae": 1e-4,
    "llava": 1e-4,
    "dpmpp": 1e-3,
    "face": 1e-4,
}
SKIP_GROUPS = {"tiny", "manifests", "clip_bpe"}


class CaseNotImplemented(Exception):
    """The fixture exercises something this build does not implement yet."""


@dataclass
class Comparison:
    output: str
    max_abs: float
    tol: float

    @property
    def ok(self) -> bool:
        return not math.isnan(self.max_abs) and self.max_abs <= self.tol


@dataclass
class CaseResult:
    name: str
    status: str  # PASS, FAIL, NOT IMPLEMENTED, ERROR
    comparisons: list[Comparison] = field(default_factory=list)
    detail: str = ""

    @property
    def worst(self) -> Comparison | None:
        if not self.comparisons:
            return None

        def ratio(c: Comparison) -> float:
            if math.isnan(c.max_abs):
                return math.inf
            return c.max_abs / c.tol if c.tol > 0 else (math.inf if c.max_abs > 0 else 0.0)

        return max(self.comparisons, key=ratio)

    def line(self) -> str:
        w = self.worst
        if w is None:
            return f"{self.name}  {self.status}" + (f"  ({self.detail})" if self.detail else "")
        s = f"{self.name}  max_abs={w.max_abs:.1e}  tol={w.tol:.1e}  {self.status}"
        if self.status != "PASS" and w is not None:
            s += f"  [{w.output}]"
        if self.detail:
            s += f"  ({self.detail})"
        return s


class Fixture:
    """One safetensors fixture file: tensors as numpy, metadata values JSON-decoded where possible."""

    def __init__(self, root: Path, path: Path):
        from safetensors import safe_open

        self.root = root
        self.path = path
        self.group = path.parent.name
        self.name = f"{self.group}/{path.stem}"
        with safe_open(str(path), framework="numpy") as f:
            raw = f.metadata() or {}
            self.tensors: dict[str, np.ndarray] = {k: f.get_tensor(k) for k in f.keys()}
        self.meta: dict[str, Any] = {}
        for k, v in raw.items():
            self.meta[k] = _decode_meta(v)
        # The call parameters: the index's `params` for this case, over what the file's metadata records.
        self.params: dict[str, Any] = {**self.meta, **_index_params(root).get(f"{self.group}/{path.name}", {})}

    def param(self, key: str) -> Any:
        """One call parameter of this case; a case that does not record it cannot be replayed faithfully."""
        if key not in self.params:
            raise KeyError(f"{self.name} records no '{key}' (neither in index.json params nor in its metadata)")
        return self.params[key]

    def __getitem__(self, key: str) -> np.ndarray:
        return self.tensors[key]

    def __contains__(self, key: str) -> bool:
        return key in self.tensors


@functools.lru_cache(maxsize=8)
def _index_params(root: Path) -> dict[str, dict[str, Any]]:
    index = root / "index.json"
    if not index.exists():
        return {}
    return {e["file"]: e.get("params") or {} for e in json.loads(index.read_text()) if "file" in e}


def _decode_meta(v: str) -> Any:
    """Metadata values are JSON or Python literals (the generator wrote some dicts with repr)."""
    try:
        return json.loads(v)
    except (json.JSONDecodeError, TypeError):
        pass
    try:
        return ast.literal_eval(v)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return v


class Context:
    """What a group handler needs besides its fixture: tolerances and the (lazily loaded) tiny model."""

    def __init__(self, root: Path, rtol_override: float | None = None):
        self.root = root
        self.rtol_override = rtol_override
        self._cache: dict[str, Any] = {}

    @cached_property
    def rtols(self) -> dict[str, float]:
        rtols = dict(DEFAULT_RTOL)
        readme = self.root / "README.md"
        if readme.exists():
            group = None
            for line in readme.read_text().splitlines():
                m = re.match(r"^###\s+(\S+)\s*$", line)
                if m:
                    group = m.group(1)
                    continue
                m = re.match(r"^Suggested rtol:\s*([0-9.eE+-]+)", line)
                if m and group:
                    rtols[group] = float(m.group(1))
        return rtols

    def rtol(self, group: str) -> float:
        if self.rtol_override is not None:
            return self.rtol_override
        return self.rtols.get(group, 1e-4)

    def cached(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    @property
    def config_path(self) -> Path:
        return self.root / "tiny" / "config.json"

    def config(self):
        from ..config import SUPIRConfig

        return self.cached("config", lambda: SUPIRConfig.from_reference(self.config_path))

    def checkpoint_paths(self) -> list[Path]:
        paths = sorted((self.root / "tiny").glob("*.safetensors"))
        if not paths:
            raise FileNotFoundError(f"no checkpoint in {self.root / 'tiny'}")
        return paths

    def weights(self):
        """The tiny checkpoint as {official key: numpy array}."""
        from ..weights.loading import read_weights

        return self.cached("weights", lambda: read_weights(self.checkpoint_paths()))

    def component(self, key: str, build: Callable[[], Any], prefix: str) -> Any:
        """A sub-network built by `build()` and loaded (strictly, fp32) from the keys under `prefix`."""
        from ..weights.loading import load_official

        def make():
            module = build()
            load_official(module, self.weights(), prefix=prefix)
            module.eval()
            return module

        return self.cached(key, make)

    def model(self):
        """The fp32 SUPIR model built from tiny/config.json and loaded from tiny/*.safetensors."""

        def build():
            from ..weights.loading import load_supir_model

            return load_supir_model(self.config(), self.checkpoint_paths())

        return self.cached("model", build)


def compare(output: str, ours: Any, ref: np.ndarray, rtol: float) -> Comparison:
    """max |ours - ref| against rtol * max |ref| (NaNs must coincide)."""
    a = np.asarray(ours, dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"{output}: shape {a.shape} != reference {b.shape}")
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    if (nan_a != nan_b).any():
        return Comparison(output, float("nan"), 0.0)
    mask = ~nan_b
    if not mask.any():
        return Comparison(output, 0.0, 0.0)
    inf_b = np.isinf(b)
    if (np.isinf(a) != inf_b).any() or (a[inf_b] != b[inf_b]).any():
        return Comparison(output, float("inf"), 0.0)
    mask &= ~inf_b
    diff = float(np.max(np.abs(a[mask] - b[mask]))) if mask.any() else 0.0
    scale = float(np.max(np.abs(b[mask]))) if mask.any() else 0.0
    return Comparison(output, diff, rtol * scale)


def compare_exact(output: str, ours: Any, ref: np.ndarray) -> Comparison:
    """Integer results (token ids, timestep indices): every element equal."""
    a = np.asarray(ours)
    b = np.asarray(ref)
    if a.shape != b.shape:
        raise AssertionError(f"{output}: shape {a.shape} != reference {b.shape}")
    return Comparison(output, float(np.max(np.abs(a.astype(np.int64) - b.astype(np.int64)), initial=0)), 0.0)


def discover(root: Path, select: Iterable[str] = ()) -> list[Path]:
    """Fixture files under root, optionally filtered by group folder or case-name substring."""
    index = root / "index.json"
    # model weights stored beside fixtures (llava/llava_tiny.safetensors) are not in the index
    listed = {e["file"] for e in json.loads(index.read_text())} if index.exists() else None
    files = []
    for p in sorted(root.glob("*/*.safetensors")):
        if p.parent.name in SKIP_GROUPS or (listed is not None and f"{p.parent.name}/{p.name}" not in listed):
            continue
        files.append(p)
    select = list(select)
    if select:
        chosen = []
        for p in files:
            name = f"{p.parent.name}/{p.stem}"
            if any(s.rstrip("/") == p.parent.name or s in name for s in select):
                chosen.append(p)
        files = chosen
    return files


def run_case(path: Path, ctx: Context) -> CaseResult:
    group = path.parent.name
    name = f"{group}/{path.stem}"
    try:
        handler = importlib.import_module(f"{__name__}.groups.{group}")
        fixture = Fixture(ctx.root, path)
        comparisons = handler.run(fixture, ctx)
    except ModuleNotFoundError as e:
        if e.name and e.name.endswith(f"groups.{group}"):
            return CaseResult(name, "NOT IMPLEMENTED", detail=f"no handler for group '{group}'")
        return _error(name, e)
    except CaseNotImplemented as e:
        return CaseResult(name, "NOT IMPLEMENTED", detail=str(e))
    except Exception as e:  # one broken case must not stop the others
        return _error(name, e)
    if not comparisons:
        return CaseResult(name, "ERROR", detail="handler compared nothing")
    status = "PASS" if all(c.ok for c in comparisons) else "FAIL"
    return CaseResult(name, status, comparisons)


def _error(name: str, e: Exception) -> CaseResult:
    tb = traceback.extract_tb(e.__traceback__)[-1]
    return CaseResult(name, "ERROR", detail=f"{type(e).__name__}: {e} at {Path(tb.filename).name}:{tb.lineno}")


def run(root: Path, select: Iterable[str] = (), rtol: float | None = None) -> Iterable[CaseResult]:
    ctx = Context(root, rtol)
    for path in discover(root, select):
        yield run_case(path, ctx)
