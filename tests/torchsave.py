"""A torch.save look-alike for tests: torch-format zip checkpoints written without PyTorch.

The layout torch.save writes: a zip with `<root>/data.pkl`, a protocol-2 pickle whose tensors are
`torch._utils._rebuild_tensor_v2` calls on persistent storage ids, and one raw record per storage; stand-in
`torch` modules make the standard pickler emit exactly torch's opcodes.
"""

from __future__ import annotations

import collections
import contextlib
import io
import pickle
import sys
import types
import zipfile
from pathlib import Path

import numpy as np


def _rebuild_tensor_v2(*args):
    raise AssertionError("never called: only pickled by reference")


_rebuild_tensor_v2.__module__ = "torch._utils"

_STORAGE_CLASSES = {}
for _name in ("FloatStorage", "HalfStorage", "BFloat16Storage", "LongStorage"):
    _STORAGE_CLASSES[_name] = type(_name, (), {"__module__": "torch"})

_ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": "pytorch_lightning.callbacks.model_checkpoint"})


@contextlib.contextmanager
def _fake_torch_modules():
    """Just enough of `torch` and `pytorch_lightning` in sys.modules for pickle to name the globals."""
    mods = {
        "torch": types.ModuleType("torch"),
        "torch._utils": types.ModuleType("torch._utils"),
        "pytorch_lightning": types.ModuleType("pytorch_lightning"),
        "pytorch_lightning.callbacks": types.ModuleType("pytorch_lightning.callbacks"),
        "pytorch_lightning.callbacks.model_checkpoint": types.ModuleType("pytorch_lightning.callbacks.model_checkpoint"),
    }
    mods["torch._utils"]._rebuild_tensor_v2 = _rebuild_tensor_v2
    for name, cls in _STORAGE_CLASSES.items():
        setattr(mods["torch"], name, cls)
    mods["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint = _ModelCheckpoint
    assert not any(m in sys.modules for m in mods)
    sys.modules.update(mods)
    try:
        yield
    finally:
        for m in mods:
            del sys.modules[m]


class Storage:
    """A torch storage: raw little-endian bytes of `numel` elements of one type."""

    _KIND = {"float32": "FloatStorage", "float16": "HalfStorage", "bfloat16": "BFloat16Storage", "int64": "LongStorage"}

    def __init__(self, key: str, values: np.ndarray, dtype: str):
        self.key, self.dtype, self.numel = key, dtype, values.size
        if dtype == "bfloat16":  # values must be bfloat16-representable float32
            self.data = (values.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
        else:
            self.data = values.astype({"float32": "<f4", "float16": "<f2", "int64": "<i8"}[dtype]).tobytes()


class Tensor:
    def __init__(self, storage: Storage, offset: int, size: tuple, stride: tuple):
        self.args = (storage, offset, size, stride)

    def __reduce_ex__(self, protocol):
        storage, offset, size, stride = self.args
        return _rebuild_tensor_v2, (storage, offset, size, stride, False, collections.OrderedDict())


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", _STORAGE_CLASSES[Storage._KIND[obj.dtype]], obj.key, "cpu", obj.numel)
        return None


def torch_save(obj, path: Path, root: str = "archive", byteorder: bytes = b"little") -> None:
    buf = io.BytesIO()
    storages: dict[str, Storage] = {}

    def collect(o):
        if isinstance(o, Tensor):
            storages[o.args[0].key] = o.args[0]
        elif isinstance(o, dict):
            for v in o.values():
                collect(v)

    collect(obj)
    with _fake_torch_modules():
        _TorchPickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(f"{root}/data.pkl", buf.getvalue())
        z.writestr(f"{root}/byteorder", byteorder)
        for key, st in storages.items():
            z.writestr(f"{root}/data/{key}", st.data)
        z.writestr(f"{root}/version", b"3\n")


class _LegacyPickler(_TorchPickler):
    def persistent_id(self, obj):
        pid = super().persistent_id(obj)
        return None if pid is None else pid + (None,)


def torch_save_legacy(obj, path: Path) -> None:
    """torch.save(obj, _use_new_zipfile_serialization=False): magic, protocol, system info and the object as
    pickles, the sorted storage keys, then each storage as its int64 element count and raw bytes."""
    storages: dict[str, Storage] = {}

    def collect(o):
        if isinstance(o, Tensor):
            storages[o.args[0].key] = o.args[0]
        elif isinstance(o, dict):
            for v in o.values():
                collect(v)

    collect(obj)
    buf = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(header, buf, protocol=2)
    with _fake_torch_modules():
        _LegacyPickler(buf, protocol=2).dump(obj)
    keys = sorted(storages)
    pickle.dump(keys, buf, protocol=2)
    for key in keys:
        buf.write(np.int64(storages[key].numel).tobytes() + storages[key].data)
    Path(path).write_bytes(buf.getvalue())


def save_tensors(tensors: dict[str, np.ndarray], path: Path, legacy: bool = False) -> None:
    """torch.save(state_dict) of float32/float16 numpy arrays, one contiguous storage per tensor (legacy: the
    pre-1.6 format)."""
    state = {}
    for i, (k, v) in enumerate(tensors.items()):
        v = np.ascontiguousarray(v)
        kind = "float16" if v.dtype == np.float16 else "float32"
        strides = tuple(int(np.prod(v.shape[j + 1 :])) for j in range(v.ndim))
        state[k] = Tensor(Storage(str(i), v.reshape(-1), kind), 0, tuple(v.shape), strides)
    (torch_save_legacy if legacy else torch_save)(state, path)
