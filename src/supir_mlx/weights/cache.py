"""Converted MLX weights, made once per set of source checkpoints and reused by every later run.

    <SUPIR_MLX_HOME or ~/.cache/supir-mlx>/models/<slot>-<key>/

`slot` names what was asked for (source file names, dtype, quantization); `key` hashes everything
that decides the bytes inside: each source's name, size and sampled-content fingerprint
(convert.fingerprint: 16 blocks of 64 KiB, so a 7 GB file is identified in milliseconds), the dtype,
the quantization, and both format versions (this cache's and convert's). Any change gives a new key;
when a new entry is made, older entries of the same slot are deleted, so a replaced checkpoint or a
format bump never leaves stale gigabytes behind. An entry is built under a temporary name and renamed
when complete; `entry.json`, written last, marks it valid.

An unquantized entry is exactly a `supir-mlx convert` folder. A quantized entry holds the quantized
model's parameters (`weights.safetensors`), its `config.json` and the QuantSpec; it is made from a
temporary conversion, one module at a time, so the full-precision model is never in memory at once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..config import SUPIRConfig
from . import convert as conv
from .quantize import QuantSpec, quantize

CACHE_FORMAT = "supir-mlx-cache"
CACHE_VERSION = 1
ENTRY = "entry.json"
QUANT_WEIGHTS = "weights.safetensors"


class CacheError(ValueError):
    """A cache entry that cannot be made or read (one line, says what to do)."""


def cache_root() -> Path:
    home = os.environ.get("SUPIR_MLX_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "supir-mlx") / "models"


def _identity(path: Path) -> dict:
    if not path.is_file():
        raise CacheError(f"checkpoint not found: {path}")
    return {"name": path.name, "bytes": path.stat().st_size, "fingerprint": conv.fingerprint(path)}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def entry_dir(sources: Iterable[str | Path], dtype: str = "float16", quant: QuantSpec | None = None,
              config: SUPIRConfig | None = None, root: Path | None = None) -> Path:
    """Where the entry for these inputs lives (whether or not it exists yet)."""
    sources = [Path(p) for p in sources]
    asked = {"sources": [p.name for p in sources], "dtype": dtype, "quant": quant.to_dict() if quant else None}
    identity = {
        **asked,
        "sources": [_identity(p) for p in sources],
        "config": (config or SUPIRConfig.sdxl_v0()).to_dict(),
        "versions": [CACHE_VERSION, conv.FORMAT_VERSION],
    }
    return (root or cache_root()) / f"{_digest(asked)[:8]}-{_digest(identity)[:16]}"


def lookup(sources, dtype: str = "float16", quant: QuantSpec | None = None, config: SUPIRConfig | None = None,
           root: Path | None = None) -> Path | None:
    """The valid entry for these inputs, or None."""
    d = entry_dir(sources, dtype, quant, config, root)
    try:
        entry = json.loads((d / ENTRY).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return d if entry.get("format") == CACHE_FORMAT and entry.get("version") == CACHE_VERSION else None


def ensure(sources, dtype: str = "float16", quant: QuantSpec | None = None, config: SUPIRConfig | None = None,
           root: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """The entry for these inputs, converting (and quantizing) the checkpoints first if needed."""
    sources = [Path(p) for p in sources]

    def build(tmp: Path) -> None:
        if quant is None:
            conv.convert(sources, tmp, config, dtype, log)
        else:
            full = tmp / "full"
            conv.convert(sources, full, config, dtype, log)
            _write_quantized(full, tmp, quant, None)
            shutil.rmtree(full)
            log(f"  quantized to {quant.bits} bits")

    log_line = f"converting {', '.join(p.name for p in sources)} once into {{}} (later runs load it directly)"
    return _ensure(sources, dtype, quant, config, root, build, lambda d: log(log_line.format(d)))


def ensure_quantized(folder: str | Path, dtype: str, quant: QuantSpec, root: Path | None = None,
                     log: Callable[[str], None] = print) -> Path:
    """The quantized entry made from a `supir-mlx convert` folder (its shards are the sources, so a changed
    folder makes a new entry); the folder itself is only read."""
    folder = Path(folder)
    config = conv.check_folder(folder)
    shards = [folder / sh["file"] for sh in conv.read_manifest(folder)["shards"]]

    def build(tmp: Path) -> None:
        tmp.mkdir()
        _write_quantized(folder, tmp, quant, dtype)

    def announce(d: Path) -> None:
        log(f"quantizing {folder} to {quant.bits} bits once into {d} (later runs load it directly)")

    return _ensure(shards, dtype, quant, config, root, build, announce)


def _ensure(sources, dtype, quant, config, root, build, announce) -> Path:
    found = lookup(sources, dtype, quant, config, root)
    if found:
        return found
    d = entry_dir(sources, dtype, quant, config, root)
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = d.parent / f".{d.name}.{os.getpid()}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    announce(d)
    try:
        build(tmp)
        entry = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "dtype": dtype,
                 "quant": quant.to_dict() if quant else None, "sources": [_identity(p) for p in sources]}
        (tmp / ENTRY).write_text(json.dumps(entry, indent=1))
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
    except conv.ConvertError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CacheError(str(e)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    slot = d.name.split("-")[0]
    for old in d.parent.glob(f"{slot}-*"):
        if old != d:
            shutil.rmtree(old, ignore_errors=True)
    return d


def _write_quantized(folder: Path, out: Path, quant: QuantSpec, dtype: str | None) -> None:
    """Quantize a convert folder's model into `out` one module at a time: neither the full-precision model nor
    the quantized one is ever in memory at once. `dtype` None keeps the stored dtypes."""
    params = dict(tree_flatten(quantize(_lazy_model(folder, dtype), quant).parameters()))  # lazy; the model is dropped
    save_streaming(out / QUANT_WEIGHTS, params, {"format": "mlx"})
    shutil.copy(folder / conv.CONFIG, out / conv.CONFIG)


# safetensors' names for the dtypes a model's parameters can have
_SAFETENSORS_DTYPES = {
    mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32", mx.int32: "I32",
    mx.uint8: "U8", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16", mx.int64: "I64", mx.uint64: "U64",
    mx.bool_: "BOOL",
}


def save_streaming(path: Path, arrays: dict[str, mx.array], metadata: dict[str, str]) -> None:
    """Write `arrays` (lazy; the dict is emptied) as one safetensors file, evaluating one module's arrays at a time
    and dropping each once written: the peak is one module, not the file (`mx.save_safetensors` takes every
    array evaluated at once; a quantized SDXL UNet with its text encoders is 6.2 GB). Shapes and dtypes are known
    before evaluation, so the header goes first: the format's 8-byte little-endian header size, the JSON header
    padded with spaces to a multiple of 8, then the tensors back to back in header order."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for key, a in arrays.items():
        if a.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"{key}: {a.dtype} has no safetensors name")
        header[key] = {"dtype": _SAFETENSORS_DTYPES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        # a module's arrays together: a quantized weight, its scales and biases come out of one operation
        for _, group in itertools.groupby(list(arrays), key=lambda k: k.rpartition(".")[0]):
            keys = list(group)
            mx.eval(*(arrays[k] for k in keys))
            for k in keys:
                f.write(memoryview(mx.contiguous(arrays.pop(k))))


def _lazy_model(directory: Path, dtype: str | None = None):
    """The SUPIRModel of a convert folder with its weights mapped from disk but not read yet (cast lazily to
    component_dtypes(dtype) when given)."""
    from ..models.supir import SUPIRModel
    from .loading import component_dtypes, component_of

    manifest = conv.read_manifest(directory)
    model = SUPIRModel(SUPIRConfig.load(directory / conv.CONFIG))
    dtypes = component_dtypes(dtype) if dtype else None
    for shard in manifest["shards"]:
        try:
            stored = mx.load(str(directory / shard["file"]))
        except (RuntimeError, ValueError, OSError) as e:
            raise conv.ConvertError(f"{directory}: shard {shard['file']} is corrupt ({str(e).splitlines()[0]}); "
                                    "convert the checkpoints again") from None
        if dtypes:
            stored = {k: v.astype(dtypes[component_of(k)]) if mx.issubdtype(v.dtype, mx.floating) else v
                      for k, v in stored.items()}
        model.update(tree_unflatten(list(stored.items())))
    return model


def load(directory: str | Path, lazy: bool = False):
    """The SUPIRModel of a cache entry (quantized entries come back quantized), loaded strictly; `lazy` as
    in convert.load_converted: checked, nothing read yet."""
    from ..models.supir import SUPIRModel

    directory = Path(directory)
    try:
        entry = json.loads((directory / ENTRY).read_text())
    except (OSError, json.JSONDecodeError):
        raise CacheError(f"{directory} is not a complete supir-mlx cache entry; delete it to convert again") from None
    spec = QuantSpec.from_dict(entry.get("quant"))
    if spec is None:
        return conv.load_converted(directory, lazy=lazy)
    model = quantize(SUPIRModel(SUPIRConfig.load(directory / conv.CONFIG)), spec)
    try:
        model.load_weights(str(directory / QUANT_WEIGHTS), strict=True)
    except (ValueError, RuntimeError) as e:
        raise CacheError(f"{directory / QUANT_WEIGHTS}: {str(e).splitlines()[0]}; delete the folder to convert again") from None
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model
