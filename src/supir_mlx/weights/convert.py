"""Official checkpoints -> an MLX-native weights folder, and loading that folder back.

A converted folder holds everything later commands need, with no official file:

    config.json                   SUPIRConfig.to_dict()
    manifest.json                 format, per-component dtypes, sources (name, size, fingerprint), shards
    weights-00001.safetensors ... parameters in MLX layout, keyed by MLX parameter path (<= 2 GB each)

Conversion is planned from shapes first (a file that does not fit the architecture fails before
anything is written), then streams tensor by tensor into shards, so peak memory is about one shard.
The folder is written under a temporary name and renamed when complete: an interrupted conversion
never leaves a folder that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from importlib.metadata import version
from pathlib import Path
from typing import Callable, Iterable

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..config import SUPIRConfig
from .checkpoint import CheckpointError, read_checkpoint
from .loading import (
    WeightError,
    WeightSet,
    component_dtypes,
    component_of,
    convert_tensor,
    dtype_name,
    parse_dtype,
    plan,
    read_weights,
    release,
)

FORMAT = "supir-mlx-weights"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.json"
SHARD_BYTES = 2 * 1024**3

# One tensor from each part, to tell the user which checkpoint is missing from a conversion.
_PART_PROBES = {
    "the SDXL base checkpoint": "model.diffusion_model.input_blocks.0.0.weight",
    "the SUPIR checkpoint": "model.control_model.input_hint_block.0.weight",
}


class ConvertError(ValueError):
    """A conversion or converted folder that cannot be used (one line, says what to do)."""


def fingerprint(path: Path, blocks: int = 16, block_size: int = 1 << 16) -> str:
    """A cheap content fingerprint: sha256 of the size and 16 evenly spaced 64 KiB blocks.

    Tells two checkpoint files apart in seconds where a full hash of 7 GB takes a minute; downloads
    are verified against full hashes elsewhere (weights/hub.py).
    """
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(blocks):
            f.seek(max(0, (size - block_size) * i // max(1, blocks - 1)))
            h.update(f.read(block_size))
    return "sha256-sampled:" + h.hexdigest()


def _build(config: SUPIRConfig):
    # Constructing the modules only records their random initialisation lazily: nothing is allocated
    # as long as those arrays are never evaluated, and loading replaces every one of them.
    from ..models.supir import SUPIRModel

    return SUPIRModel(config)


def _plan(params: dict[str, tuple[int, ...]], weights: WeightSet, default_config: bool) -> dict[str, str]:
    try:
        return plan(params, weights)
    except WeightError as e:
        absent = [part for part, probe in _PART_PROBES.items() if probe not in weights]
        if absent and str(e).startswith("missing key"):
            raise ConvertError(f"{e}: {' and '.join(absent)} seems not to be among the inputs") from None
        if default_config and str(e).startswith(("shape mismatch", "unexpected key")):
            raise ConvertError(f"{e} (the files do not match the SDXL/SUPIR-v0 architecture; pass --config)") from None
        raise ConvertError(str(e)) from None


def convert(
    sources: Iterable[str | Path],
    out_dir: str | Path,
    config: SUPIRConfig | None = None,
    dtype: str = "float16",
    log: Callable[[str], None] = lambda msg: None,
) -> Path:
    """Convert official checkpoints (SDXL base first, then SUPIR; or one file holding both) into `out_dir`.

    `dtype` applies to the UNet, control encoder and text encoders; the VAE is float32 unless
    bfloat16 is asked for (component_dtypes). `out_dir` must not exist yet.
    """
    sources = [Path(p) for p in sources]
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ConvertError(f"{out_dir} already exists; choose a new output folder (nothing is overwritten)")
    dtypes = component_dtypes(parse_dtype(dtype))
    try:
        weights = read_weights(sources)
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    model = _build(config or SUPIRConfig.sdxl_v0())
    params = {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}
    mapping = _plan(params, weights, config is None)

    sizes = {name: _numel(params[name]) * dtypes[component_of(name)].size for name in params}
    total = sum(sizes.values())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out_dir.parent).free
    if free < total + (64 << 20):
        raise ConvertError(f"not enough disk space in {out_dir.parent}: need {total / 1e9:.1f} GB, {free / 1e9:.1f} GB free")

    tmp = out_dir.parent / f".{out_dir.name}.{os.getpid()}.partial"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier, killed run of this process id
    tmp.mkdir()
    try:
        log(f"converting {len(mapping)} tensors ({total / 1e9:.2f} GB) from {', '.join(p.name for p in sources)}")
        shards = _write_shards(tmp, mapping, weights, params, dtypes, sizes, log)
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "created_by": f"supir-mlx {version('supir-mlx')}",
            "dtypes": {c: dtype_name(d) for c, d in dtypes.items()},
            "num_parameters": sum(_numel(s) for s in params.values()),
            "sources": [{"name": p.name, "bytes": p.stat().st_size, "fingerprint": fingerprint(p)} for p in sources],
            "shards": shards,
        }
        (tmp / CONFIG).write_text(json.dumps((config or SUPIRConfig.sdxl_v0()).to_dict(), indent=1))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out_dir} ({len(shards)} shard{'s' * (len(shards) > 1)})")
    return out_dir


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _write_shards(tmp, mapping, weights, params, dtypes, sizes, log) -> list[dict]:
    shards: list[dict] = []
    pending: dict[str, mx.array] = {}
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        name = f"weights-{len(shards) + 1:05d}.safetensors"
        mx.save_safetensors(str(tmp / name), pending, metadata={"format": "mlx"})
        shards.append({"file": name, "bytes": (tmp / name).stat().st_size, "tensors": len(pending)})
        log(f"  {name}: {len(pending)} tensors, {pending_bytes / 1e9:.2f} GB")
        pending, pending_bytes = {}, 0

    for name in sorted(mapping):
        if pending and pending_bytes + sizes[name] > SHARD_BYTES:
            flush()
        key = mapping[name]
        try:
            pending[name] = convert_tensor(key, weights[key], params[name], dtypes[component_of(name)])
            release(weights, key)
        except (CheckpointError, ValueError) as e:
            raise ConvertError(f"cannot read '{key}' from {weights.source(key).name}: {e}") from None
        pending_bytes += sizes[name]
    if pending:
        flush()
    return shards


def read_manifest(directory: str | Path) -> dict:
    """The folder's manifest, checked for what loading relies on (format, version, a list of shards)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ConvertError(f"{directory} is not a folder; give a folder written by `supir-mlx convert`")
    if not path.is_file():
        raise ConvertError(f"{directory} is not a converted weights folder (no {MANIFEST}); run `supir-mlx convert` first")
    try:
        manifest = json.loads(path.read_text())
    except OSError as e:
        raise ConvertError(f"{directory}: {MANIFEST} cannot be read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConvertError(f"{directory}: {MANIFEST} is corrupt (not JSON); convert the checkpoints again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConvertError(f"{directory}: {MANIFEST} is not a supir-mlx weights manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ConvertError(
            f"{directory} uses weights format version {manifest.get('version')}; this supir-mlx reads version "
            f"{FORMAT_VERSION}: convert the checkpoints again"
        )
    shards = manifest.get("shards")
    if (not isinstance(shards, list) or not shards
            or not all(isinstance(sh, dict) and isinstance(sh.get("file"), str) and isinstance(sh.get("bytes"), int)
                       and Path(sh["file"]).name == sh["file"] for sh in shards)):
        raise ConvertError(f"{directory}: {MANIFEST} lists no valid shards (file name and size each); "
                           "convert the checkpoints again")
    return manifest


def read_config(directory: str | Path) -> SUPIRConfig:
    """The architecture a converted folder describes (config.json), or one line saying what is wrong."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise ConvertError(f"{directory}: no {CONFIG} (the architecture description); convert the checkpoints again")
    try:
        return SUPIRConfig.load(path)
    except OSError as e:
        raise ConvertError(f"{directory}: {CONFIG} cannot be read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConvertError(f"{directory}: {CONFIG} is corrupt (not JSON); convert the checkpoints again") from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ConvertError(f"{directory}: {CONFIG} does not describe a SUPIR architecture ({e})") from None


def check_folder(directory: str | Path) -> SUPIRConfig:
    """Everything about a converted folder that can be checked without reading the weights: manifest, config,
    every shard present and of its recorded size. Returns the architecture; raises ConvertError (one line
    naming the folder and what is wrong)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    config = read_config(directory)
    for shard in manifest["shards"]:
        path = directory / shard["file"]
        if not path.is_file():
            raise ConvertError(f"{directory}: shard {shard['file']} is missing; convert the checkpoints again")
        size = path.stat().st_size
        if size != shard["bytes"]:
            what = "truncated" if size < shard["bytes"] else "larger than recorded"
            raise ConvertError(f"{directory}: shard {shard['file']} is {what} ({size} of {shard['bytes']} bytes); "
                               "convert the checkpoints again")
        try:
            read_checkpoint(path)  # the header only: a damaged shard is named before any work
        except (CheckpointError, OSError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).removeprefix(f"{path.name}: ")
            raise ConvertError(f"{directory}: shard {shard['file']} cannot be read ({reason}); "
                               "convert the checkpoints again") from None
    return config


def load_converted(directory: str | Path, dtype: str | mx.Dtype | None = None, lazy: bool = False):
    """The SUPIRModel stored in a converted folder, loaded strictly.

    `dtype` None keeps the stored dtypes; otherwise components are cast as component_dtypes(dtype) says.
    `lazy`: names, shapes and file sizes are checked, but no weight is read until it is evaluated (what a
    staged restore wants: pipeline.residency reads each part when its stage comes).
    """
    directory = Path(directory)
    config = check_folder(directory)
    manifest = read_manifest(directory)
    dtypes = component_dtypes(dtype) if dtype is not None else None
    model = _build(config)
    params = {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}
    loaded: dict[str, mx.array] = {}
    for shard in manifest["shards"]:
        path = directory / shard["file"]
        try:
            stored = mx.load(str(path))
        except (RuntimeError, ValueError, OSError) as e:
            raise ConvertError(f"{directory}: shard {path.name} is corrupt ({str(e).splitlines()[0]}); "
                               "convert the checkpoints again") from None
        for name, arr in stored.items():
            if name not in params:
                raise ConvertError(f"{path.name}: unexpected parameter '{name}'")
            if name in loaded:
                raise ConvertError(f"{path.name}: parameter '{name}' is stored twice")
            if tuple(arr.shape) != params[name]:
                raise ConvertError(f"{path.name}: '{name}' has shape {tuple(arr.shape)}, expected {params[name]}")
            if dtypes is not None and mx.issubdtype(arr.dtype, mx.floating):
                arr = arr.astype(dtypes[component_of(name)])
                if not lazy:
                    mx.eval(arr)  # one tensor at a time, so the stored copy is dropped right away
            loaded[name] = arr
    missing = sorted(set(params) - set(loaded))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConvertError(f"{directory}: missing parameter '{missing[0]}'{more}; convert the checkpoints again")
    model.update(tree_unflatten(list(loaded.items())))
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model

