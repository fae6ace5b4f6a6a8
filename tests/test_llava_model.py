"""LLaVA model: reference conformance, both checkpoint layouts, strict loading, preprocessing, 13B quantized size."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from PIL import Image
from safetensors.numpy import load_file, save_file

from supir_mlx.conformance import Context, run_case
from supir_mlx.config import ConfigError
from supir_mlx.models.llava import LlavaConfig, LlavaModel, preprocess_image, split_at_image
from supir_mlx.weights.llava_convert import ORIGINAL_IMAGE_TOKEN, load_source, quantized_nbytes
from supir_mlx.weights.loading import WeightError


@pytest.fixture(scope="module")
def tiny(reference_dir):
    return reference_dir / "llava" / "llava_tiny.safetensors", reference_dir / "llava" / "llava_tiny_config.json"


@pytest.fixture(scope="module")
def io(reference_dir):
    from supir_mlx.conformance import Fixture

    return Fixture(reference_dir, reference_dir / "llava" / "llava_io.safetensors")


def test_conformance_llava_passes(reference_dir):
    result = run_case(reference_dir / "llava" / "llava_io.safetensors", Context(reference_dir))
    assert result.status == "PASS", result.line()
    by_name = {c.output: c for c in result.comparisons}
    assert set(by_name) == {"pixel_values", "image_features", "logits", "new_ids", "generated_ids"}
    assert by_name["logits"].max_abs < 1e-5  # fp32 vs fp32: far inside rtol 1e-4 * max|ref|


def test_only_layers_up_to_the_feature_layer_are_built(tiny):
    model = load_source(tiny[0], config=tiny[1])
    assert len(model.vision_tower.vision_model.encoder.layers) == 2  # hidden_states[-2] of a 3-layer tower
    assert "post_layernorm" not in model.vision_tower.vision_model


def _original_layout(tiny, tmp_path, pickled: bool = False):
    """The tiny llava-hf weights renamed into the liuhaotian release + a separate CLIPModel checkpoint
    (as safetensors, or as the PyTorch .bin pickles the original release ships)."""
    w = load_file(str(tiny[0]))
    hf = json.loads(tiny[1].read_text())
    lm, clip = {}, {"text_model.embeddings.token_embedding.weight": np.zeros((8, 4), np.float32)}
    for k, v in w.items():
        if k.startswith("language_model.model."):
            lm["model." + k[len("language_model.model.") :]] = v
        elif k.startswith("language_model.lm_head."):
            lm["lm_head." + k[len("language_model.lm_head.") :]] = v
        elif k.startswith("multi_modal_projector.linear_"):
            idx = {"1": "0", "2": "2"}[k[len("multi_modal_projector.linear_")]]
            lm[f"model.mm_projector.{idx}." + k.split(".")[-1]] = v
        else:
            clip[k[len("vision_tower.") :]] = v
    (tmp_path / "llava").mkdir()
    (tmp_path / "clip").mkdir()
    if pickled:
        from torchsave import save_tensors

        save_tensors(lm, tmp_path / "llava" / "pytorch_model-00001-of-00001.bin")
        save_tensors(clip, tmp_path / "clip" / "pytorch_model.bin")
    else:
        save_file(lm, str(tmp_path / "llava" / "model.safetensors"))
        save_file(clip, str(tmp_path / "clip" / "model.safetensors"))
    flat = {**hf["text_config"], "model_type": "llava", "mm_projector_type": "mlp2x_gelu",
            "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_hidden_size": 32}
    (tmp_path / "llava" / "config.json").write_text(json.dumps(flat))
    (tmp_path / "clip" / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": hf["vision_config"]}))
    return tmp_path / "llava", tmp_path / "clip"


@pytest.mark.parametrize("pickled", [False, True], ids=["safetensors", "pytorch-bin"])
def test_original_layout_gives_identical_logits(tiny, io, tmp_path, pickled):
    llava, clip = _original_layout(tiny, tmp_path, pickled)
    ours = load_source(llava, clip=clip)
    hf = load_source(tiny[0], config=tiny[1])
    assert ours.config.image_token_index == ORIGINAL_IMAGE_TOKEN
    ids = io["input_ids"][0].tolist()
    pixels = preprocess_image(io["image_hwc_uint8"], 28)
    ref = np.asarray(hf(ids, pixels))
    orig_ids = [ORIGINAL_IMAGE_TOKEN if t == hf.config.image_token_index else t for t in ids]
    np.testing.assert_array_equal(np.asarray(ours(orig_ids, pixels)), ref)
    np.testing.assert_allclose(ref, io["logits"], atol=1e-5)


def test_original_layout_needs_the_clip_tower(tiny, tmp_path):
    llava, _ = _original_layout(tiny, tmp_path)
    with pytest.raises(WeightError, match="no vision tower"):
        load_source(llava)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda w: w.pop("multi_modal_projector.linear_2.bias"), "missing key 'multi_modal_projector.linear_2.bias'"),
        (lambda w: w.update({"language_model.model.extra.weight": np.zeros(3, np.float32)}), "unexpected key 'language_model.model.extra.weight'"),
        (lambda w: w.update({"language_model.model.norm.weight": np.zeros(63, np.float32)}), "shape mismatch for 'language_model.model.norm.weight'"),
    ],
)
def test_strict_loading_names_the_bad_key(tiny, tmp_path, edit, message):
    w = load_file(str(tiny[0]))
    edit(w)
    save_file(w, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightError, match=message.replace("(", r"\(")):
        load_source(tmp_path / "model.safetensors", config=tiny[1])


def test_config_errors_are_one_line(tiny):
    d = json.loads(tiny[1].read_text())
    with pytest.raises(ConfigError, match="vision_feature_select_strategy"):
        LlavaConfig.from_dict({**d, "vision_feature_select_strategy": "full"})
    with pytest.raises(ConfigError, match="not a LLaVA config"):
        LlavaConfig.from_dict(d["text_config"])
    with pytest.raises(ConfigError, match="unknown LLaVA-1.5 size"):
        LlavaConfig.llava_v15("70b")


@pytest.mark.parametrize("size, expect", [((50, 37), (37, 28)), ((37, 50), (28, 37)), ((28, 28), (28, 28))])
def test_preprocess_short_side_then_centre_crop(size, expect):
    # a gradient image: the crop must be the centre of the resized image, for portrait and landscape
    w, h = size
    x = np.broadcast_to(np.arange(w, dtype=np.uint8)[None, :, None] * 4, (h, w, 3)).copy()
    resized = np.asarray(Image.fromarray(x).resize(expect, Image.BICUBIC))
    top, left = (expect[1] - 28) // 2, (expect[0] - 28) // 2
    want = (resized[top : top + 28, left : left + 28].astype(np.float64) / 255).astype(np.float32)
    got = np.asarray(preprocess_image(x, 28))[0]
    std = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
    mean = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
    np.testing.assert_allclose(got * std + mean, want, atol=1e-6)


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 2), np.uint8), "photo.png"])
def test_preprocess_rejects_bad_images(bad):
    with pytest.raises(ValueError, match="expected"):
        preprocess_image(bad, 28)


def test_split_at_image_needs_one_full_run():
    assert split_at_image([1, 7, 9, 9, 9, 5], 9, 3) == ([1, 7], [5])
    with pytest.raises(ValueError, match="one run of 3"):
        split_at_image([1, 9, 9, 5, 9], 9, 3)


def test_quantized_size_formula_matches_a_real_quantization(tiny):
    model = load_source(tiny[0], config=tiny[1], dtype=mx.float16)
    shapes = {k: v.shape for k, v in tree_flatten(model.language_model.parameters()) if v.ndim == 2}
    nn.quantize(model.language_model, 64, 4)
    mx.eval(model.parameters())
    params = dict(tree_flatten(model.language_model.parameters()))
    for k, shape in shapes.items():
        base = k[: -len("weight")]
        real = sum(params[base + s].nbytes for s in ("weight", "scales", "biases"))
        assert real == quantized_nbytes(shape, 4, 64), k


def test_13b_at_4_bits_has_the_expected_parameter_bytes(reference_dir):
    manifest = json.loads((reference_dir / "manifests" / "llava_v15_13b_hf.json").read_text())["tensors"]
    expected = 0
    for k, shape in manifest.items():
        if k.startswith("language_model."):
            expected += quantized_nbytes(tuple(shape), 4, 64) if len(shape) == 2 else 2 * shape[0]
    # the whole 13B model, built and quantized lazily: shapes only, nothing is allocated
    mx.reset_peak_memory()
    model = LlavaModel(LlavaConfig.llava_v15("13b"))
    model.set_dtype(mx.float16)
    nn.quantize(model.language_model, 64, 4)
    built = sum(v.nbytes for _, v in tree_flatten(model.language_model.parameters()))
    assert mx.get_peak_memory() < 64 << 20
    assert built == expected
    assert 7.30e9 < expected < 7.35e9  # 13.02e9 parameters at 4.5 bits (4-bit + fp16 scale/bias per 64)


def test_13b_manifest_and_our_architecture_agree(reference_dir):
    manifest = json.loads((reference_dir / "manifests" / "llava_v15_13b_hf.json").read_text())["tensors"]
    model = LlavaModel(LlavaConfig.llava_v15("13b"))
    ours = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    cfg = model.config
    from supir_mlx.models.llava import kept, mlx_layout

    theirs = {k: tuple(mlx_layout(cfg, k, mx.zeros(tuple(s))).shape) for k, s in manifest.items() if kept(cfg, k)}
    assert ours == theirs
    dropped = set(manifest) - set(theirs)
    assert dropped and all(k.startswith(("vision_tower.vision_model.encoder.layers.23.", "vision_tower.vision_model.post_layernorm.")) for k in dropped)
