"""Reading checkpoint files without PyTorch: `.safetensors`, torch's zip `.ckpt`/`.pt`/`.pth`, and the legacy
(pre-1.6) torch format that older release files such as facexlib's face detector still use.

Both formats are opened as a memory map and described tensor by tensor (dtype, shape, byte offset,
strides); a tensor is read only when it is asked for, as a numpy view of the map. So a 7 GB SDXL file
costs no RAM until its tensors are converted, one at a time.

A torch checkpoint is a zip holding `<name>/data.pkl` (a pickle) and one raw record per storage
(`<name>/data/<key>`); a legacy file is a run of pickles (magic number, protocol, system info, the object,
the storage keys) followed by each storage as an 8-byte element count and its raw bytes. The pickle is replayed by a restricted unpickler that can only rebuild tensors
and plain containers: every global it meets is either one of a few tensor-rebuilding functions (which
we implement ourselves), a known piece of training metadata (turned into an inert placeholder that
is never called), or refused before anything runs.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import json
import mmap
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np


class CheckpointError(ValueError):
    """A file that cannot be read as a checkpoint (wrong format, truncated, or unsafe)."""


@dataclass(frozen=True)
class _Entry:
    dtype: str  # our dtype name: float32, float16, bfloat16, ...
    shape: tuple[int, ...]
    offset: int  # byte offset of element 0 in the file
    strides: tuple[int, ...]  # in elements


# numpy dtype of each stored element type; bfloat16 is read as raw 16-bit words and widened exactly.
_NUMPY = {
    "float64": "<f8",
    "float32": "<f4",
    "float16": "<f2",
    "bfloat16": "<u2",
    "int64": "<i8",
    "int32": "<i4",
    "int16": "<i2",
    "int8": "i1",
    "uint8": "u1",
    "uint16": "<u2",
    "uint32": "<u4",  # MLX's packed quantized weights
    "uint64": "<u8",
    "bool": "?",
}
_ITEMSIZE = {k: np.dtype(v).itemsize for k, v in _NUMPY.items()}


class Checkpoint(Mapping[str, np.ndarray]):
    """The tensors of one checkpoint file, by official key, read lazily from a memory map.

    `ckpt[key]` is a numpy array (a read-only view of the file where possible; bfloat16 comes back as
    float32, which holds every bfloat16 value exactly). `shape(key)` and `dtype(key)` need no read.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"checkpoint not found: {self.path}")
        self.size = self.path.stat().st_size
        if self.size < 16:
            raise CheckpointError(f"{self.path.name}: too small to be a checkpoint ({self.size} bytes)")
        with open(self.path, "rb") as f:
            head = f.read(16)
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if head.startswith(b"PK\x03\x04"):
            self._entries, self.dropped = _read_torch_zip(self.path, self._map, self.size)
        elif head[8:9] == b"{":
            self._entries, self.dropped = _read_safetensors_header(self.path.name, self._map, self.size), []
        elif head[:1] == b"\x80":
            self._entries, self.dropped = _read_torch_legacy(self.path, self._map, self.size)
        else:
            raise CheckpointError(f"{self.path.name}: not a .safetensors file or a PyTorch zip checkpoint")

    def __getitem__(self, key: str) -> np.ndarray:
        e = self._entries[key]
        itemsize = _ITEMSIZE[e.dtype]
        arr = np.ndarray(
            e.shape,
            dtype=_NUMPY[e.dtype],
            buffer=self._map,
            offset=e.offset,
            strides=tuple(s * itemsize for s in e.strides),
        )
        if e.dtype == "bfloat16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].shape

    def release(self, key: str) -> None:
        """Drop the file pages of a tensor already converted from this process's resident memory.

        They stay in the OS file cache; without this a whole 7 GB checkpoint ends up counted in
        the converting process's footprint.
        """
        e = self._entries[key]
        itemsize = _ITEMSIZE[e.dtype]
        span = itemsize * (1 + sum((n - 1) * s for n, s in zip(e.shape, e.strides))) if all(e.shape) else 0
        start = e.offset - e.offset % mmap.PAGESIZE
        if span and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED, start, e.offset + span - start)

    def dtype(self, key: str) -> str:
        """The stored element type ('float16', 'bfloat16', 'float32', ...)."""
        return self._entries[key].dtype


def read_checkpoint(path: str | Path) -> Checkpoint:
    """All tensors of a `.safetensors` or torch zip checkpoint, by official key (lazily read)."""
    return Checkpoint(path)


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


# ---- safetensors ---------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
}


def _read_safetensors_header(name: str, data: mmap.mmap, size: int) -> dict[str, _Entry]:
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > size:
        raise CheckpointError(f"{name}: truncated safetensors file (header runs past the end of the file)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{name}: corrupt safetensors header") from None
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            stored, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            if not 0 <= begin <= end:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{name}: corrupt safetensors header entry for '{key}'") from None
        if stored not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{name}: tensor '{key}' has unsupported dtype {stored}")
        dtype = _SAFETENSORS_DTYPES[stored]
        if end - begin != _ITEMSIZE[dtype] * int(np.prod(shape, dtype=np.int64)):
            raise CheckpointError(f"{name}: corrupt safetensors header: size of '{key}' does not match its shape")
        if 8 + n + end > size:
            raise CheckpointError(f"{name}: truncated safetensors file (tensor '{key}' runs past the end of the file)")
        entries[key] = _Entry(dtype, shape, 8 + n + begin, _contiguous(shape))
    return entries


# ---- torch zip checkpoints -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _StorageRef:
    dtype: str
    key: str
    numel: int


@dataclass(frozen=True, slots=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


class _Inert:
    """Stand-in for a training-metadata object (Lightning callback state, OmegaConf config, ...).

    Absorbs whatever the pickle does with it (construction arguments, state, items) and keeps none
    of it: the real class is never imported or called.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Inert":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _Frozen:
    """Base of the objects a pickle can reach by name: no __dict__ and no attribute assignment, so a
    pickle's BUILD opcode cannot alter them for this or any later load."""

    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        raise CheckpointError("the pickle tries to modify a tensor-rebuilding function")


class _StorageType(_Frozen):
    __slots__ = ("dtype",)

    def __init__(self, dtype: str):
        object.__setattr__(self, "dtype", dtype)

    def __call__(self, *args: Any) -> Any:
        raise CheckpointError("the pickle constructs a storage instead of referencing one")


class _Function(_Frozen):
    __slots__ = ("fn",)

    def __init__(self, fn: Any):
        object.__setattr__(self, "fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


_STORAGE_TYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "UntypedStorage": "uint8",
}


def _rebuild_tensor(storage: Any, offset: int, size: Any, stride: Any, *_: Any) -> _TensorRef:
    if not isinstance(storage, _StorageRef):
        raise CheckpointError("malformed tensor record in the pickle (its storage is not a storage reference)")
    shape, strides = tuple(int(n) for n in size), tuple(int(s) for s in stride)
    if len(shape) != len(strides) or int(offset) < 0 or any(n < 0 for n in shape) or any(s < 0 for s in strides):
        raise CheckpointError("malformed tensor record in the pickle (bad shape, stride or offset)")
    last = int(offset) + sum((n - 1) * s for n, s in zip(shape, strides)) if all(shape) else -1
    if last >= storage.numel:
        raise CheckpointError(f"malformed tensor record in the pickle (reads past the end of storage '{storage.key}')")
    return _TensorRef(storage, int(offset), shape, strides)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    # Protocol-2 pickles spell a bytes object as _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError("unexpected use of _codecs.encode in the pickle")
    return text.encode("latin1")


# The only callables a pickle may reach: our own pure functions that validate their arguments, and
# immutable builtin containers.
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _Function(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor"): _Function(_rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _Function(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Function(_rebuild_parameter),
    ("torch", "Size"): tuple,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): _Function(_codecs_encode),
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_TYPES.items()},
    ("torch.storage", "UntypedStorage"): _StorageType("uint8"),
}

# Training metadata that Lightning / SD checkpoints carry next to the weights; replaced by _Inert.
_INERT_MODULE_PREFIXES = ("pytorch_lightning.", "lightning.pytorch.", "lightning_fabric.", "omegaconf.")
_INERT_GLOBALS = {
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("argparse", "Namespace"),
    ("typing", "Any"),
    ("torch", "device"),
    ("collections", "defaultdict"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles spell some globals by their Python 2 names (__builtin__.set, ...).
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if (module, name) in _INERT_GLOBALS or module.startswith(_INERT_MODULE_PREFIXES):
            return type(name, (_Inert,), {"__module__": "supir_mlx.inert"})
        raise CheckpointError(f"refusing to load: the pickle references '{module}.{name}', which is not a tensor or plain data")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"malformed storage reference in the pickle: {pid!r:.80}")
        _, kind, key, _location, numel = pid
        if not (isinstance(kind, _StorageType) and isinstance(key, str) and isinstance(numel, int)):
            raise CheckpointError(f"malformed storage reference in the pickle: {pid!r:.80}")
        return _StorageRef(kind.dtype, key, numel)


class _LegacyUnpickler(_RestrictedUnpickler):
    """Legacy storage ids carry a sixth field, the view metadata, which torch never set for state dicts; every
    storage met is recorded (its element size locates the records that follow the pickles)."""

    def __init__(self, stream: Any, seen: dict[str, _StorageRef]):
        super().__init__(stream)
        self.seen = seen

    def persistent_load(self, pid: Any) -> _StorageRef:
        if isinstance(pid, tuple) and len(pid) == 6 and pid[5] is None:
            st = super().persistent_load(pid[:5])
            self.seen[st.key] = st
            return st
        raise CheckpointError(f"malformed storage reference in the legacy pickle: {pid!r:.80}")


def unpickle_restricted(data: bytes | Any, seen: dict[str, _StorageRef] | None = None) -> Any:
    """Replay a torch pickle with only tensor references and plain data (see module docstring); `data` is the
    pickle's bytes or a file positioned at it (left just after it); `seen` collects legacy storage ids."""
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return (_RestrictedUnpickler(stream) if seen is None else _LegacyUnpickler(stream, seen)).load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of a hostile or damaged pickle gets one clear line
        raise CheckpointError(f"corrupt pickle ({type(e).__name__}: {e})") from None


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _state_dict(name: str, obj: Any) -> dict:
    for _ in range(2):  # the official load_state_dict applies d.get('state_dict', d) twice
        if isinstance(obj, dict) and "state_dict" in obj:
            obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{name}: the checkpoint holds a {type(obj).__name__}, not a state dict")
    return obj


def _read_torch_legacy(path: Path, data: mmap.mmap, size: int) -> tuple[dict[str, _Entry], list[str]]:
    name = path.name
    data.seek(0)
    try:
        if unpickle_restricted(data) != _LEGACY_MAGIC or unpickle_restricted(data) != _LEGACY_PROTOCOL:
            raise CheckpointError(f"{name}: a pickle file, but not a torch checkpoint")
        info = unpickle_restricted(data)
        if isinstance(info, dict) and not info.get("little_endian", True):
            raise CheckpointError(f"{name}: big-endian checkpoints are not supported")
        refs: dict[str, _StorageRef] = {}
        obj = _state_dict(name, unpickle_restricted(data, refs))
        keys = unpickle_restricted(data)
    except CheckpointError as e:
        if "corrupt pickle" in str(e):
            raise CheckpointError(f"{name}: truncated or corrupt legacy torch checkpoint") from None
        raise
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise CheckpointError(f"{name}: corrupt legacy torch checkpoint (bad storage key list)")
    records: dict[str, int] = {}
    pos = data.tell()
    for key in keys:
        st = refs.get(key)
        if st is None or pos + 8 > size:
            raise CheckpointError(f"{name}: corrupt or truncated legacy torch checkpoint (storage '{key}')")
        (numel,) = struct.unpack("<q", data[pos : pos + 8])
        if numel < st.numel:
            raise CheckpointError(f"{name}: storage record '{key}' is shorter than its tensors need")
        records[key] = pos + 8
        pos += 8 + numel * _ITEMSIZE[st.dtype]
    if pos > size:
        raise CheckpointError(f"{name}: truncated legacy torch checkpoint (storage data runs past the end of the file)")
    return _entries(name, obj, lambda st: records.get(st.key))


def _read_torch_zip(path: Path, data: mmap.mmap, size: int) -> tuple[dict[str, _Entry], list[str]]:
    name = path.name
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise CheckpointError(f"{name}: truncated or corrupt zip checkpoint") from None
    with archive:
        members = {info.filename: info for info in archive.infolist()}
        pkls = [m for m in members if m.endswith("/data.pkl") and m.count("/") == 1]
        if len(pkls) != 1:
            what = "a TorchScript archive" if any(m.endswith("/constants.pkl") for m in members) else "a torch checkpoint"
            raise CheckpointError(f"{name}: not {what} with one data.pkl; only torch.save() checkpoints are supported")
        root = pkls[0][: -len("data.pkl")]
        order = members.get(root + "byteorder")
        if order is not None and archive.read(order).strip() != b"little":
            raise CheckpointError(f"{name}: big-endian checkpoints are not supported")
        try:
            obj = unpickle_restricted(archive.read(pkls[0]))
        except zipfile.BadZipFile:
            raise CheckpointError(f"{name}: corrupt zip checkpoint (data.pkl is damaged)") from None
    records: dict[str, int] = {}

    def record(st: _StorageRef) -> int:
        if st.key not in records:
            records[st.key] = _record_offset(name, data, size, members.get(f"{root}data/{st.key}"), st)
        return records[st.key]

    return _entries(name, _state_dict(name, obj), record)


def _entries(name: str, obj: dict, record) -> tuple[dict[str, _Entry], list[str]]:
    """Tensor entries of a state dict whose storages `record(storage)` locates (byte offset of element 0)."""
    entries: dict[str, _Entry] = {}
    dropped: list[str] = []
    for key, value in obj.items():
        if not (isinstance(key, str) and isinstance(value, _TensorRef)):
            dropped.append(str(key))
            continue
        st = value.storage
        start = record(st)
        if start is None:
            raise CheckpointError(f"{name}: storage record '{st.key}' is missing")
        entries[key] = _Entry(st.dtype, value.shape, start + value.offset * _ITEMSIZE[st.dtype], value.strides)
    return entries, dropped


def _record_offset(name: str, data: mmap.mmap, size: int, info: zipfile.ZipInfo | None, st: _StorageRef) -> int:
    """Byte offset of a storage record's data inside the file (records are stored uncompressed)."""
    if info is None:
        raise CheckpointError(f"{name}: storage record '{st.key}' is missing from the archive")
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(f"{name}: storage record '{st.key}' is compressed; torch.save never does that, re-save the file")
    if info.file_size < st.numel * _ITEMSIZE[st.dtype]:
        raise CheckpointError(f"{name}: storage record '{st.key}' is shorter than its tensors need")
    local = data[info.header_offset : info.header_offset + 30]
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{name}: corrupt zip checkpoint (bad local header of record '{st.key}')")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > size:
        raise CheckpointError(f"{name}: truncated checkpoint (record '{st.key}' runs past the end of the file)")
    return start
