"""Checkpoint reading without PyTorch: safetensors, torch zip checkpoints, and refusal of unsafe pickles.

The torch checkpoints are written here byte for byte the way torch.save lays them out (a zip with
`<root>/data.pkl`, a protocol-2 pickle whose tensors are `torch._utils._rebuild_tensor_v2` calls on
persistent storage ids, and one raw record per storage), with stand-in `torch` modules so the
standard pickler emits exactly torch's opcodes.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from supir_mlx.weights.checkpoint import CheckpointError, read_checkpoint, unpickle_restricted

from torchsave import Storage, Tensor, _ModelCheckpoint, _fake_torch_modules, _TorchPickler, save_tensors, torch_save  # noqa: E402


def bf16_values(rng, shape) -> np.ndarray:
    """float32 values that bfloat16 represents exactly."""
    return (rng.standard_normal(shape).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)


# ---- torch zip checkpoints -------------------------------------------------------------------------


def test_torch_zip_values_strides_offsets_and_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.standard_normal(6 * 5).astype(np.float32)
    shared = Storage("0", base, "float32")
    half = rng.standard_normal(12).astype(np.float16)
    bf = bf16_values(rng, 8)
    ints = np.arange(77, dtype=np.int64)
    sd = collections.OrderedDict(
        {
            "a.weight": Tensor(shared, 0, (6, 5), (5, 1)),
            "a.weight_t": Tensor(shared, 0, (5, 6), (1, 5)),  # a transposed view of the same storage
            "a.row2": Tensor(shared, 10, (5,), (1,)),  # offset into the shared storage
            "b.conv": Tensor(Storage("1", half, "float16"), 0, (2, 3, 1, 2), (6, 2, 2, 1)),
            "c.bf": Tensor(Storage("2", bf, "bfloat16"), 2, (3, 2), (2, 1)),
            "d.ids": Tensor(Storage("3", ints, "int64"), 0, (1, 77), (77, 1)),
            "e.scalar": Tensor(Storage("4", np.array([2.5], np.float32), "float32"), 0, (), ()),
        }
    )
    path = tmp_path / "model.ckpt"
    torch_save(sd, path)
    ck = read_checkpoint(path)
    m = base.reshape(6, 5)
    np.testing.assert_array_equal(ck["a.weight"], m)
    np.testing.assert_array_equal(ck["a.weight_t"], m.T)
    np.testing.assert_array_equal(ck["a.row2"], base[10:15])
    np.testing.assert_array_equal(ck["b.conv"], half.reshape(2, 3, 1, 2))
    assert ck["b.conv"].dtype == np.float16 and ck.dtype("b.conv") == "float16"
    np.testing.assert_array_equal(ck["c.bf"], bf[2:8].reshape(3, 2))
    assert ck.dtype("c.bf") == "bfloat16" and ck["c.bf"].dtype == np.float32
    np.testing.assert_array_equal(ck["d.ids"], ints[None])
    assert ck["e.scalar"].shape == () and float(ck["e.scalar"]) == 2.5
    assert ck.shape("a.weight_t") == (5, 6) and len(ck) == 7


def test_lightning_nesting_and_metadata_are_handled(tmp_path):
    """{'state_dict': {'state_dict': sd}} is unwrapped twice; Lightning metadata is dropped, never run."""
    w = np.arange(4, dtype=np.float32)
    callback = _ModelCheckpoint()
    callback.best_model_path = "/runs/best.ckpt"
    callback.best_model_score = np.float64(0.25)  # a numpy scalar, as Lightning stores monitors
    ckpt = {
        "epoch": 3,
        "global_step": 1200,
        "pytorch-lightning_version": "1.9.0",
        "callbacks": {_ModelCheckpoint: {"state": callback, "raw": b"\x00\xffbytes"}},
        "state_dict": {
            "state_dict": {"w": Tensor(Storage("0", w, "float32"), 0, (4,), (1,)), "note": "not a tensor"},
        },
    }
    path = tmp_path / "lightning.ckpt"
    torch_save(ckpt, path, root="lightning")
    ck = read_checkpoint(path)
    assert list(ck) == ["w"]
    np.testing.assert_array_equal(ck["w"], w)
    assert ck.dropped == ["note"]


def test_unknown_global_is_refused_by_name(tmp_path):
    obj = {"w": types.SimpleNamespace(x=1)}
    path = tmp_path / "odd.ckpt"
    torch_save(obj, path)
    with pytest.raises(CheckpointError, match=r"'types\.SimpleNamespace'"):
        read_checkpoint(path)


class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


@pytest.mark.parametrize("which", ["os.system", "builtins.eval", "builtins.exec", "subprocess.call"])
def test_malicious_pickle_is_refused_and_never_executed(tmp_path, which):
    import subprocess

    marker = tmp_path / "pwned"
    payload = {
        "os.system": (os.system, f"touch {marker}"),
        "builtins.eval": (eval, f"open({str(marker)!r}, 'w')"),
        "builtins.exec": (exec, f"open({str(marker)!r}, 'w')"),
        "subprocess.call": (subprocess.call, ["touch", str(marker)]),
    }[which]
    name = f"{payload[0].__module__}.{payload[0].__name__}"
    data = pickle.dumps({"state_dict": {"w": _Evil(*payload)}}, protocol=2)
    with pytest.raises(CheckpointError, match=f"'{name}'"):
        unpickle_restricted(data)
    path = tmp_path / "evil.ckpt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data)
    with pytest.raises(CheckpointError, match=f"'{name}'"):
        read_checkpoint(path)
    assert not marker.exists()


def test_pickle_cannot_tamper_with_rebuild_functions():
    """A BUILD opcode on an allowed global (e.g. to redefine a storage type's dtype) is refused."""
    data = (
        b"\x80\x02ctorch\nHalfStorage\n}X\x05\x00\x00\x00dtypeX\x07\x00\x00\x00float64sN\x86b."
    )  # HalfStorage, then BUILD with slot state {'dtype': 'float64'}
    with pytest.raises(CheckpointError):
        unpickle_restricted(data)
    rng = np.random.default_rng(1)
    half = rng.standard_normal(3).astype(np.float16)
    buf = io.BytesIO()
    with _fake_torch_modules():
        _TorchPickler(buf, protocol=2).dump({"h": Tensor(Storage("0", half, "float16"), 0, (3,), (1,))})
    assert unpickle_restricted(buf.getvalue())["h"].storage.dtype == "float16"


def test_legacy_torch_format_reads_like_zip(tmp_path):
    """Pre-1.6 torch.save files (facexlib's detector is one): same tensors, views of the file, strict keys."""
    rng = np.random.default_rng(3)
    tensors = {"module.a.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
               "module.a.bias": rng.standard_normal(4).astype(np.float16), "b.n": np.array([7], dtype=np.float32)}
    save_tensors(tensors, tmp_path / "legacy.pth", legacy=True)
    ck = read_checkpoint(tmp_path / "legacy.pth")
    assert set(ck) == set(tensors)
    for k, v in tensors.items():
        assert ck.shape(k) == v.shape and ck[k].dtype == v.dtype and np.array_equal(ck[k], v)


def test_legacy_truncated_and_foreign_files_get_one_line_errors(tmp_path):
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02M\xe9\x03.")
    with pytest.raises(CheckpointError, match="truncated or corrupt legacy"):
        read_checkpoint(legacy)
    save_tensors({"w": np.ones(1000, np.float32)}, tmp_path / "full.pth", legacy=True)
    cut = tmp_path / "cut.pth"
    cut.write_bytes((tmp_path / "full.pth").read_bytes()[:-200])
    with pytest.raises(CheckpointError, match="truncated legacy"):
        read_checkpoint(cut)
    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        read_checkpoint(other)

    good = tmp_path / "good.ckpt"
    torch_save({"w": Tensor(Storage("0", np.ones(1000, np.float32), "float32"), 0, (1000,), (1,))}, good)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[:-200])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(cut)

    short = tmp_path / "short.ckpt"  # the pickle asks for more elements than the record holds
    torch_save({"w": Tensor(Storage("0", np.ones(4, np.float32), "float32"), 2, (4,), (1,))}, short)
    with pytest.raises(CheckpointError, match="reads past the end of storage"):
        read_checkpoint(short)

    text = tmp_path / "notes.safetensors"
    text.write_text("these are not weights at all")
    with pytest.raises(CheckpointError, match="not a .safetensors file"):
        read_checkpoint(text)
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "missing.ckpt")

    big = tmp_path / "big.ckpt"
    torch_save({"w": Tensor(Storage("0", np.ones(2, np.float32), "float32"), 0, (2,), (1,))}, big, byteorder=b"big")
    with pytest.raises(CheckpointError, match="big-endian"):
        read_checkpoint(big)


# ---- safetensors -----------------------------------------------------------------------------------


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple, bytes]]) -> None:
    header, blobs, pos = {}, [], 0
    for key, (dtype, shape, raw) in tensors.items():
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + len(raw)]}
        blobs.append(raw)
        pos += len(raw)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_safetensors_bf16_fp16_fp32(tmp_path):
    rng = np.random.default_rng(2)
    bf = bf16_values(rng, (3, 4))
    f16 = rng.standard_normal((2, 2)).astype(np.float16)
    f32 = rng.standard_normal(5).astype(np.float32)
    path = tmp_path / "w.safetensors"
    _write_safetensors(
        path,
        {
            "bf": ("BF16", bf.shape, (bf.view("<u4") >> 16).astype("<u2").tobytes()),
            "h": ("F16", f16.shape, f16.astype("<f2").tobytes()),
            "f": ("F32", f32.shape, f32.astype("<f4").tobytes()),
        },
    )
    ck = read_checkpoint(path)
    np.testing.assert_array_equal(ck["bf"], bf)
    np.testing.assert_array_equal(ck["h"], f16)
    np.testing.assert_array_equal(ck["f"], f32)
    assert [ck.dtype(k) for k in ("bf", "h", "f")] == ["bfloat16", "float16", "float32"]


def test_safetensors_matches_reference_reader_and_truncation(reference_dir, tmp_path):
    from safetensors.numpy import load_file

    path = reference_dir / "tiny" / "supir_tiny.safetensors"
    ck = read_checkpoint(path)
    ref = load_file(str(path))
    assert set(ck) == set(ref)
    for key in ("denoiser.sigmas", "model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.1.model.logit_scale"):
        assert ck[key].dtype == ref[key].dtype
        np.testing.assert_array_equal(ck[key], ref[key])
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(cut)
