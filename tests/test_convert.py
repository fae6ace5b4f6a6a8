"""`supir-mlx convert` and `load_converted`: the tiny reference checkpoint in, the official values out."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file

from supir_mlx.cli import main
from supir_mlx.weights.convert import ConvertError, load_converted, read_manifest

SUPIR_PREFIXES = ("model.control_model.", "model.diffusion_model.project_modules.", "first_stage_model.denoise_encoder.")


@pytest.fixture(scope="module")
def tiny(reference_dir):
    return reference_dir / "tiny" / "supir_tiny.safetensors", reference_dir / "tiny" / "config.json"


@pytest.fixture(scope="module")
def official(tiny):
    return load_file(str(tiny[0]))


def convert_cli(*args):
    return CliRunner().invoke(main, ["convert", *map(str, args)])


def expected_mlx(value: np.ndarray, shape: tuple) -> np.ndarray:
    """The official tensor in MLX layout: conv [o,i,kh,kw] -> [o,kh,kw,i]; a 1x1 conv held as Linear -> [o,i]."""
    if value.ndim == 4:
        value = value.transpose(0, 2, 3, 1)
        if len(shape) == 2:
            value = value.reshape(shape)
    return value


def params_of(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def test_cli_convert_float32_reproduces_every_official_tensor(tmp_path, tiny, official):
    out = tmp_path / "tiny-mlx"
    result = convert_cli(tiny[0], "--config", tiny[1], "-o", out, "--dtype", "float32")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest["dtypes"] == dict.fromkeys(("unet", "control", "vae", "text"), "float32")
    assert manifest["sources"][0]["name"] == "supir_tiny.safetensors"
    assert manifest["sources"][0]["bytes"] == tiny[0].stat().st_size
    assert not list(tmp_path.glob(".*partial"))

    params = params_of(load_converted(out))
    expected_keys = {k for k in official if k not in ("denoiser.sigmas",)}
    assert set(params) == expected_keys
    assert manifest["num_parameters"] == sum(p.size for p in params.values())
    for name, p in params.items():
        assert p.dtype == mx.float32, name
        np.testing.assert_array_equal(np.array(p), expected_mlx(official[name].astype(np.float32), p.shape), err_msg=name)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_component_dtypes_and_recast(tmp_path, tiny, official, dtype):
    out = tmp_path / dtype
    assert convert_cli(tiny[0], "--config", tiny[1], "-o", out, "--dtype", dtype).exit_code == 0
    vae_dtype = "float32" if dtype == "float16" else "bfloat16"  # the VAE is never float16
    assert read_manifest(out)["dtypes"] == {"unet": dtype, "control": dtype, "vae": vae_dtype, "text": dtype}
    params = params_of(load_converted(out))
    want = {"model.": getattr(mx, dtype), "conditioner.": getattr(mx, dtype), "first_stage_model.": getattr(mx, vae_dtype)}
    for name, p in params.items():
        assert p.dtype == next(d for pre, d in want.items() if name.startswith(pre)), name
    name = "first_stage_model.decoder.conv_in.weight"
    ref = mx.array(expected_mlx(official[name].astype(np.float32), params[name].shape)).astype(getattr(mx, vae_dtype))
    assert mx.array_equal(params[name], ref)

    recast = params_of(load_converted(out, dtype="float32"))
    assert {p.dtype for p in recast.values()} == {mx.float32}
    name = "model.diffusion_model.input_blocks.0.0.weight"
    np.testing.assert_array_equal(np.array(recast[name]), np.array(params[name].astype(mx.float32)))


def test_two_files_load_in_official_order(tmp_path, tiny, official):
    """SDXL first, SUPIR second: a key present in both takes the SUPIR file's value."""
    sdxl = {k: v for k, v in official.items() if not k.startswith(SUPIR_PREFIXES)}
    supir = {k: v for k, v in official.items() if k.startswith(SUPIR_PREFIXES)}
    override = "model.diffusion_model.out.2.bias"
    supir[override] = official[override] + np.float16(1)
    supir["mask_LQ"] = np.zeros((1, 4, 8, 8), np.float16)  # training-only key of original SUPIR files
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    save_file(supir, str(tmp_path / "supir.safetensors"))
    out = tmp_path / "two"
    args = (tmp_path / "sdxl.safetensors", tmp_path / "supir.safetensors", "--config", tiny[1], "--dtype", "float32")
    result = convert_cli(*args, "-o", out)
    assert result.exit_code == 0, result.output
    params = params_of(load_converted(out))
    np.testing.assert_array_equal(np.array(params[override]), supir[override].astype(np.float32))
    assert [s["name"] for s in read_manifest(out)["sources"]] == ["sdxl.safetensors", "supir.safetensors"]

    result = convert_cli(tmp_path / "supir.safetensors", "--config", tiny[1], "-o", tmp_path / "only-supir")
    assert result.exit_code == 1
    assert "missing key" in result.output and "the SDXL base checkpoint seems not to be among the inputs" in result.output
    assert not (tmp_path / "only-supir").exists()


def test_one_line_errors(tmp_path, tiny, official):
    def fails(*args, match):
        result = convert_cli(*args)
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.output
        assert "Traceback" not in result.output

    fails(tmp_path / "nope.safetensors", "--config", tiny[1], "-o", tmp_path / "a", match="checkpoint not found")
    fails(tiny[0], "--config", tmp_path / "nope.json", "-o", tmp_path / "a", match="config not found")

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny[0].read_bytes()[:5_000_000])
    fails(cut, "--config", tiny[1], "-o", tmp_path / "a", match="truncated")

    bad = dict(official)
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    bad[key] = bad[key][:, :-1]
    save_file(bad, str(tmp_path / "bad.safetensors"))
    fails(tmp_path / "bad.safetensors", "--config", tiny[1], "-o", tmp_path / "a", match=f"shape mismatch for '{key}'")

    extra = dict(official, **{"model.diffusion_model.extra.weight": np.zeros(3, np.float16)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    fails(tmp_path / "extra.safetensors", "--config", tiny[1], "-o", tmp_path / "a", match="unexpected key 'model.diffusion_model.extra.weight'")

    # Without --config the real SDXL/SUPIR-v0 architecture is checked against the file's shapes.
    fails(tiny[0], "-o", tmp_path / "a", match="pass --config")

    (tmp_path / "exists").mkdir()
    fails(tiny[0], "--config", tiny[1], "-o", tmp_path / "exists", match="already exists")
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".*partial"))


def test_damaged_converted_folder(tmp_path, tiny):
    out = tmp_path / "conv"
    assert convert_cli(tiny[0], "--config", tiny[1], "-o", out, "--dtype", "float16").exit_code == 0
    with pytest.raises(ConvertError, match="not a converted weights folder"):
        load_converted(tmp_path)
    shard = out / read_manifest(out)["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ConvertError, match="is truncated"):
        load_converted(out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(dict(manifest, version=99)))
    with pytest.raises(ConvertError, match="format version 99"):
        load_converted(out)
