"""The converted-weights cache: made once, reused, invalidated by a changed source or format version."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from supir_mlx.config import SUPIRConfig
from supir_mlx.weights import cache
from supir_mlx.weights.quantize import QuantizedConv2d, QuantizedLinear, QuantSpec, quantize


@pytest.fixture
def tiny(reference_dir, tmp_path):
    src = tmp_path / "supir_tiny.safetensors"
    shutil.copy(reference_dir / "tiny" / "supir_tiny.safetensors", src)
    return src, SUPIRConfig.load(reference_dir / "tiny" / "config.json")


def params(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def test_convert_once_then_reuse(tiny, tmp_path):
    src, config = tiny
    root = tmp_path / "models"
    logs: list[str] = []
    d = cache.ensure([src], "float32", None, config, root, log=logs.append)
    assert logs and cache.lookup([src], "float32", None, config, root) == d
    stamp = (d / cache.ENTRY).stat().st_mtime_ns
    logs.clear()
    assert cache.ensure([src], "float32", None, config, root, log=logs.append) == d
    assert logs == [] and (d / cache.ENTRY).stat().st_mtime_ns == stamp
    model = cache.load(d)
    assert params(model)["model.control_model.input_hint_block.0.weight"].dtype == mx.float32


def test_changed_source_or_version_invalidates(tiny, tmp_path, monkeypatch):
    src, config = tiny
    root = tmp_path / "models"
    first = cache.ensure([src], "float32", None, config, root, log=lambda m: None)
    data = bytearray(src.read_bytes())
    data[-1] ^= 0xFF  # same size and name, different content (the last block is fingerprinted)
    src.write_bytes(bytes(data))
    assert cache.lookup([src], "float32", None, config, root) is None
    second = cache.ensure([src], "float32", None, config, root, log=lambda m: None)
    assert second != first and not first.exists()  # the stale entry of the same slot is gone
    monkeypatch.setattr(cache, "CACHE_VERSION", cache.CACHE_VERSION + 1)
    assert cache.lookup([src], "float32", None, config, root) is None
    # other dtypes / quantizations are different slots and keys
    assert cache.entry_dir([src], "float16", None, config, root) != second
    assert cache.entry_dir([src], "float32", QuantSpec(bits=8, group_size=32), config, root) != second


def test_quantized_entry_loads_quantized_and_close(tiny, tmp_path):
    src, config = tiny
    root = tmp_path / "models"
    full = cache.load(cache.ensure([src], "float32", None, config, root, log=lambda m: None))
    spec = QuantSpec(bits=8, group_size=32)
    d = cache.ensure([src], "float32", spec, config, root, log=lambda m: None)
    assert json.loads((d / cache.ENTRY).read_text())["quant"]["bits"] == 8 and not (d / "full").exists()
    q = cache.load(d)
    kinds = {type(m) for _, m in q.model.named_modules()}
    assert QuantizedLinear in kinds and QuantizedConv2d in kinds
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in q.first_stage_model.named_modules())
    w = params(full)["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"]
    conv = q.model.diffusion_model.input_blocks[1][0].in_layers[2]
    back = mx.dequantize(conv.weight, conv.scales, conv.biases, 32, 8).reshape(w.shape)
    assert (mx.abs(back - w).max() / mx.abs(w).max()).item() < 0.01
    # written module by module, the entry holds exactly what quantizing the whole model in memory gives
    whole = params(quantize(cache.load(cache.ensure([src], "float32", None, config, root, log=lambda m: None)), spec))
    stored = params(q)
    assert stored.keys() == whole.keys()
    assert all(mx.array_equal(stored[k], whole[k]).item() and stored[k].dtype == whole[k].dtype for k in whole)


def test_streaming_safetensors_is_standard_and_holds_one_module(tmp_path):
    modules, size = 12, 1 << 20  # 4 MB of float32 per weight

    def lazy() -> dict:  # nothing exists before evaluation, as with a quantization of mapped weights
        arrays = {}
        for i in range(modules):
            arrays[f"blocks.{i}.weight"] = mx.random.normal((size,), key=mx.random.key(i))
            arrays[f"blocks.{i}.bias"] = mx.arange(8, dtype=mx.int32) + i
        arrays["head.w"] = mx.arange(32).astype(mx.bfloat16).reshape(4, 8).T  # a strided view
        return arrays

    truth = lazy()
    mx.eval(truth)
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    arrays, path = lazy(), tmp_path / "w.safetensors"
    cache.save_streaming(path, arrays, {"format": "mlx"})
    assert not arrays  # each array dropped once written
    assert mx.get_peak_memory() - base < 3 * 4 * size  # about one weight at a time, not all 12
    back = mx.load(str(path))
    assert back.keys() == truth.keys()
    assert all(mx.array_equal(back[k], truth[k]).item() and back[k].dtype == truth[k].dtype for k in truth)
    from safetensors import safe_open  # the reference reader agrees on the layout

    with safe_open(str(path), "np") as f:
        assert f.metadata() == {"format": "mlx"}
        np.testing.assert_array_equal(f.get_tensor("blocks.3.bias"), np.arange(8) + 3)
        np.testing.assert_array_equal(f.get_tensor("blocks.5.weight"), np.array(truth["blocks.5.weight"]))


def test_broken_inputs_are_one_line_errors(tiny, tmp_path):
    src, config = tiny
    with pytest.raises(cache.CacheError, match="checkpoint not found"):
        cache.ensure([tmp_path / "nope.safetensors"], root=tmp_path / "models")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(cache.CacheError):
        cache.ensure([bad], "float32", None, config, tmp_path / "models", log=lambda m: None)
    assert not list((tmp_path / "models").glob(".*partial"))
    with pytest.raises(cache.CacheError, match="not a complete supir-mlx cache entry"):
        cache.load(tmp_path)
