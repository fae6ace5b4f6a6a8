"""Captioner: prompt layout, clean-up, sampling, quantized conversion round trip, memory release, CLI."""

import json
import shutil

import mlx.core as mx
from mlx.utils import tree_flatten
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

from supir_mlx.captioner import (
    QUESTION_GRADIO,
    Captioner,
    CaptionerUnavailable,
    clean_caption,
    generate,
    make_sampler,
    prompt_ids,
    prompt_text,
)
from supir_mlx.cli import main
from supir_mlx.models.llava import load_llava, preprocess_image
from supir_mlx.weights.llava_convert import convert_llava, load_source


def _write_tokenizer(folder, size=512):
    """A word-level stand-in for the LLaMA tokenizer: ids 0/1/2 = <unk>/<s>/</s>, BOS added on encode."""
    text = prompt_text(QUESTION_GRADIO).replace("<image>", " ")
    words = sorted({w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in words + [f"w{i}" for i in range(size)]:
        if len(vocab) < size:
            vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def source(reference_dir, tmp_path_factory):
    """The tiny llava-hf checkpoint laid out like a download: weights, config.json, tokenizer."""
    folder = tmp_path_factory.mktemp("llava-hf")
    shutil.copyfile(reference_dir / "llava" / "llava_tiny.safetensors", folder / "model-00001-of-00001.safetensors")
    shutil.copyfile(reference_dir / "llava" / "llava_tiny_config.json", folder / "config.json")
    _write_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    return convert_llava(source, tmp_path_factory.mktemp("mlx") / "llava-4bit", bits=4)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("photos") / "photo.png"
    Image.fromarray(rng.integers(0, 256, (45, 60, 3), dtype=np.uint8)).save(path)
    return path


def test_prompt_is_the_vicuna_v1_template():
    assert prompt_text() == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\n"
        "Describe this image and its style in a very detailed manner. ASSISTANT:"
    )
    assert QUESTION_GRADIO.endswith("The image is a realistic photography, not an art painting.")


def test_prompt_ids_have_bos_only_at_the_start(converted):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(converted))
    before, after = prompt_ids(tok)
    system, rest = prompt_text().split("<image>")
    assert before == tok.encode(system) and before[0] == tok.bos_token_id
    assert after == tok.encode(rest)[1:] and tok.bos_token_id not in after
    assert tok.decode(after) == "Describe this image and its style in a very detailed manner . ASSISTANT :"


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("  The photo shows a cat.</s>", "The photo shows a cat."),
        ("A dog.\nIt runs.\r\nFast. </s> ", "A dog. It runs.  Fast."),
        ("no stop here", "no stop here"),
        ("</s> kept inside", "</s> kept inside"),
    ],
)
def test_clean_caption(raw, clean):
    assert clean_caption(raw) == clean


def test_sampler_follows_temperature_then_top_p():
    logprobs = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = lambda sampler: {int(sampler(logprobs).item()) for _ in range(200)}
    # at T=0.2 the tempered probabilities are ~[0.93, 0.07, 0.002, 0]: top-p 0.7 keeps only the first
    assert draws(make_sampler(0.2, 0.7, 3)) == {0}
    # at T=1 top-p 0.7 keeps the two tokens whose mass above is < 0.7 (0.5 and 0.3)
    assert draws(make_sampler(1.0, 0.7, 3)) == {0, 1}
    assert draws(make_sampler(0.0, 0.7, 3)) == {0}
    runs = [make_sampler(1.0, 1.0, seed) for seed in (7, 7, 8)]
    seqs = [[int(s(logprobs).item()) for _ in range(30)] for s in runs]
    assert seqs[0] == seqs[1] != seqs[2]


def test_conversion_writes_a_quantized_folder(converted):
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 64, "bits": 4}
    weights = {}
    for f in converted.glob("model-*.safetensors"):
        weights.update(mx.load(str(f)))
    assert weights["language_model.model.layers.0.mlp.down_proj.weight"].dtype == mx.uint32
    assert weights["language_model.model.layers.0.mlp.down_proj.weight"].shape == (64, 128 * 4 // 32)
    assert weights["language_model.model.embed_tokens.scales"].shape == (512, 1)
    assert weights["vision_tower.vision_model.embeddings.patch_embedding.weight"].shape == (32, 7, 7, 3)
    assert weights["multi_modal_projector.linear_1.weight"].dtype == mx.float16
    assert not any("layers.2." in k and k.startswith("vision") for k in weights)  # tower past hidden_states[-2]
    assert (converted / "tokenizer.json").is_file() and not converted.with_name(converted.name + ".partial").exists()


def test_quantized_round_trip_equals_in_memory_quantization(source, tmp_path, reference_dir):
    from supir_mlx.conformance import Fixture

    io = Fixture(reference_dir, reference_dir / "llava" / "llava_io.safetensors")
    ids, pixels = io["input_ids"][0].tolist(), preprocess_image(io["image_hwc_uint8"], 28)
    err = {}
    for bits in (4, 8):
        loaded = load_llava(convert_llava(source, tmp_path / f"q{bits}", bits=bits), dtype=mx.float32)
        ref = load_source(source, dtype=mx.float16)
        nn.quantize(ref.language_model, 64, bits)
        ref.set_dtype(mx.float32)
        ours = np.asarray(loaded(ids, pixels))
        np.testing.assert_array_equal(ours, np.asarray(ref(ids, pixels)))
        err[bits] = np.abs(ours - io["logits"]).max() / np.abs(io["logits"]).max()
    # 8-bit steps are 16x finer than 4-bit ones; on these random weights 4 bits are off by ~40%, 8 bits by ~2%
    assert err[8] < err[4] / 8 and err[4] < 0.6


def test_conversion_refuses_to_overwrite(source, converted):
    with pytest.raises(FileExistsError, match="already exists"):
        convert_llava(source, converted)


def test_caption_greedy_is_the_decoded_generation(converted, photo):
    with Captioner.load(converted, dtype=mx.float32) as cap:
        text = cap.caption(Image.open(photo), greedy=True, max_new_tokens=20)
        before, after = prompt_ids(cap.tokenizer)
        pixels = preprocess_image(Image.open(photo), 28)
        emb = cap.model.embed(before, cap.model.image_features(pixels)[0], after)
        ids = generate(cap.model, emb, make_sampler(0.0, 1.0, 0), 20, cap.tokenizer.eos_token_id)
        assert text == clean_caption(cap.tokenizer.decode(ids, skip_special_tokens=True)) and text
        sampled = [cap.caption(np.asarray(Image.open(photo)), seed=s, max_new_tokens=20) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_caption_releases_the_vision_tower_before_generating(converted, photo):
    with Captioner.load(converted, dtype=mx.float32) as cap:
        vision = sum(v.nbytes for m in (cap.model.vision_tower, cap.model.multi_modal_projector)
                     for _, v in tree_flatten(m.parameters()))
        mx.clear_cache()
        held = mx.get_active_memory()
        first = cap.caption(Image.open(photo), greedy=True, max_new_tokens=8)
        mx.clear_cache()
        assert cap.residency.resident == {"language"}
        assert held - mx.get_active_memory() >= 0.95 * vision  # the tower's arrays are lazy file reads again
        assert cap.caption(Image.open(photo), greedy=True, max_new_tokens=8) == first  # read back unchanged


def test_planner_counts_the_captioner_as_loaded(converted):
    """memory.llava_bytes (what the planner counts for LLaVA-1.5) equals the bytes a loaded converted folder holds,
    and the planner's KV-cache rule uses the captioner's token limit and mlx-lm's growth step."""
    from mlx_lm.models.cache import KVCache

    from supir_mlx import memory
    from supir_mlx.captioner import MAX_NEW_TOKENS
    from supir_mlx.memory import llava_bytes

    assert memory.CAPTION_NEW_TOKENS == MAX_NEW_TOKENS and memory.KV_STEP == KVCache.step

    for dtype in (mx.float16, mx.float32):
        with Captioner.load(converted, dtype=dtype) as cap:
            cfg = cap.model.config
            held = [sum(v.nbytes for m in mods for _, v in tree_flatten(m.parameters())) for mods in
                    ((cap.model.language_model,), (cap.model.vision_tower, cap.model.multi_modal_projector))]
            assert llava_bytes(cfg, dtype, cfg.quantization["bits"], cfg.quantization["group_size"]) == tuple(held)


def test_close_frees_the_weights(converted):
    mx.clear_cache()
    base = mx.get_active_memory()
    cap = Captioner.load(converted, dtype=mx.float32)
    loaded = mx.get_active_memory() - base
    assert loaded > 100_000  # the tiny model's parameters
    cap.close()
    assert mx.get_active_memory() - base < loaded // 10
    with pytest.raises(RuntimeError, match="closed"):
        cap.caption(np.zeros((8, 8, 3), np.uint8))


def test_missing_weights_say_how_to_get_them(tmp_path):
    with pytest.raises(CaptionerUnavailable, match="convert-llava"):
        Captioner.load(tmp_path / "nothing")


def test_cli_caption_and_sidecars(converted, photo, tmp_path):
    runner = CliRunner()
    img = tmp_path / "photo.png"
    shutil.copyfile(photo, img)
    with Captioner.load(converted, dtype=mx.float32) as cap:
        want = cap.caption(Image.open(photo), greedy=True)
    r = runner.invoke(main, ["caption", str(img), "--weights", str(converted), "--greedy"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == want

    r = runner.invoke(main, ["caption", str(img), "--weights", str(converted), "--greedy", "--write-sidecar"])
    assert r.exit_code == 0 and (tmp_path / "photo.txt").read_text() == want + "\n"
    (tmp_path / "photo.txt").write_text("my own words\n")
    r = runner.invoke(main, ["caption", str(img), "--weights", str(converted), "--write-sidecar"])
    assert r.exit_code == 0 and "kept existing photo.txt" in r.stderr
    assert (tmp_path / "photo.txt").read_text() == "my own words\n"
    r = runner.invoke(main, ["caption", str(img), "--weights", str(converted), "--greedy", "--write-sidecar", "--overwrite"])
    assert r.exit_code == 0 and (tmp_path / "photo.txt").read_text() == want + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png", "photo.txt"]  # no temp files left


def test_cli_errors_are_one_line(converted, photo, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["caption", str(photo), "--weights", str(tmp_path / "none")])
    assert r.exit_code == 1 and "convert-llava" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    r = runner.invoke(main, ["caption", str(bad), str(photo), "--weights", str(converted), "--greedy"])
    assert r.exit_code == 1
    assert "cannot read image" in r.stderr and str(bad) in r.stderr
    assert r.stdout.startswith(f"{photo}: ")  # the good image is still captioned


def test_cli_convert(source, tmp_path):
    r = CliRunner().invoke(main, ["convert-llava", str(source), str(tmp_path / "q8"), "--bits", "8"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "q8" / "config.json").read_text())["quantization"]["bits"] == 8


@pytest.fixture(scope="module")
def supir_weights(reference_dir, tmp_path_factory):
    from supir_mlx.weights.convert import convert

    out = tmp_path_factory.mktemp("supir") / "tiny"
    from supir_mlx.config import SUPIRConfig

    convert([reference_dir / "tiny" / "supir_tiny.safetensors"], out, SUPIRConfig.load(reference_dir / "tiny" / "config.json"),
            "float32", lambda _: None)
    return out


def test_restore_captions_the_stage1_image_then_frees_the_captioner(supir_weights, converted, photo, tmp_path, monkeypatch):
    """`restore` with captioner weights: the caption comes from LLaVA on the stage-1 image (the official
    512-px flow, same seed) and lands in the output's provenance; the captioner is not kept loaded."""
    from supir_mlx import Restorer, settings_for
    from supir_mlx.io.metadata import read_provenance

    # The random tiny LM never says </s>: cap the generation so three captions stay fast.
    caption = Captioner.caption
    monkeypatch.setattr(Captioner, "caption", lambda self, image, **kw: caption(self, image, **{**kw, "max_new_tokens": 6}))

    restorer = Restorer.from_weights(supir_weights, captioner=converted)
    settings = settings_for(steps=1, min_size=64, seed=5, caption_size=64)
    expected = restorer.caption(photo, settings)
    assert expected
    mx.clear_cache()
    before = mx.get_active_memory()
    result = restorer.restore(photo, settings)
    assert result.caption == expected
    assert mx.get_active_memory() - before < 1_000_000  # nothing of LLaVA (~0.2 MB/layer here) stays resident

    out = tmp_path / "restored.png"
    r = CliRunner().invoke(main, ["restore", str(photo), "-o", str(out), "--weights", str(supir_weights),
                                  "--captioner-weights", str(converted), "--steps", "1", "--min-size", "64", "--seed", "5",
                                  "--caption-size", "64"])
    assert r.exit_code == 0, r.output
    assert read_provenance(out)["caption"] == expected
