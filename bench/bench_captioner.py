"""Peak memory and time of the caption stage for a full-width LLaVA-1.5 with random quantized weights.

The model is built directly quantized, one layer at a time (its fp32 random init never exists for more than one
layer), with the real vision tower, projector, vocabulary and prompt length (36 + 576 image features + 18
tokens), written as a converted folder and loaded by the captioner's own loader, then run the way
`Captioner.generate_ids` runs it, one phase at a time: the image features with everything resident, then, the
vision tower released, prefill and generation. Peaks are measured above the language model's weights. The vision
phase does not depend on the depth; the language phase is the KV cache (mlx-lm's rule: steps of 256 positions),
computed for the real depth and all 512 new tokens, plus the prefill temporaries measured at `--layers`.

The language model runs on MLX's own quantized kernels, as in a restore, on every backend (on the 2-core x86-64 VM
a full-width 7B layer's 629-token prefill takes 2-3 minutes). Measure at 2 layers or more: in a 1-layer model only
the K/V projections that fill the cache are evaluated, so its temporaries are understated. Until Dec 2026 the CPU
measurement multiplied by dequantized weights instead, to save time; that aid alone held about 0.2-0.45 GB of
temporaries the real path never does, and the planner's prefill constants were fitted to it.

    python bench/bench_captioner.py [--size 7b|13b] [--bits 4|8] [--layers 2 3] [--new-tokens 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from supir_mlx import memory
from supir_mlx.captioner import MAX_NEW_TOKENS, TEMPERATURE, TOP_P, Captioner, generate, make_sampler
from supir_mlx.models.llava import LLAVA_V15_SIZES, LlavaConfig, LlavaModel, load_llava

GB = 1e9
PROMPT_BEFORE = 36  # tokens before the image in SUPIR's request (LLaMA tokenizer); the rest come after it
PROMPT_AFTER = memory.CAPTION_PROMPT_TOKENS - PROMPT_BEFORE - 576


def build(cfg: LlavaConfig, bits: int, dtype: mx.Dtype) -> LlavaModel:
    model = LlavaModel(cfg)  # lazy: nothing allocated yet
    model.set_dtype(dtype)
    nn.quantize(model.language_model, 64, bits)
    lm = model.language_model
    for part in [model.vision_tower, model.multi_modal_projector, lm.model.embed_tokens, *lm.model.layers, lm.model.norm, lm.lm_head]:
        mx.eval(part.parameters())
        mx.clear_cache()
    return model


def save(model: LlavaModel, cfg: LlavaConfig, bits: int, folder: Path) -> list[Path]:
    """The model as a converted folder, so the captioner can release and re-read its vision tower."""
    (folder / "config.json").write_text(json.dumps(
        dataclasses.replace(cfg, quantization={"group_size": 64, "bits": bits}).to_dict()))
    files = [folder / "model.safetensors"]
    mx.save_safetensors(str(files[0]), dict(tree_flatten(model.parameters())))
    return files


def nbytes(*modules: nn.Module) -> int:
    return sum(v.nbytes for m in modules for _, v in tree_flatten(m.parameters()))


def run(size: str, bits: int, layers: int, new_tokens: int, dtype: mx.Dtype) -> dict[str, float]:
    """The caption stage as `Captioner.generate_ids` runs it, one phase at a time: image features with the whole
    model resident, then (vision tower released) prefill + generation. Peaks are above the language model."""
    base = LlavaConfig.llava_v15(size)
    cfg = dataclasses.replace(base, text=dataclasses.replace(base.text, num_hidden_layers=layers, layer_types=None))
    mx.clear_cache()
    held = mx.get_active_memory()
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        files = save(build(cfg, bits, dtype), cfg, bits, Path(tmp))
        gc.collect()
        mx.clear_cache()
        model = load_llava(tmp, dtype)
        cap = Captioner(model, None, files=files)
        out = {"build_s": time.perf_counter() - t, "lm_gb": nbytes(model.language_model) / GB,
               "vision_gb": nbytes(model.vision_tower, model.multi_modal_projector) / GB}
        lm = nbytes(model.language_model) + held
        key = mx.random.key(0)
        pixels = mx.random.normal((1, 336, 336, 3), key=key)
        ids = mx.random.randint(3, 32000, (PROMPT_BEFORE + PROMPT_AFTER,), key=key).tolist()
        mx.reset_peak_memory()
        t = time.perf_counter()
        emb = model.embed(ids[:PROMPT_BEFORE], model.image_features(pixels)[0], ids[PROMPT_BEFORE:])
        mx.eval(emb)
        out["vision_s"] = time.perf_counter() - t
        out["vision_phase_gb"] = (mx.get_peak_memory() - lm) / GB
        cap.residency.use("language")
        mx.reset_peak_memory()
        t = time.perf_counter()
        tokens = generate(model, emb, make_sampler(TEMPERATURE, TOP_P, 0), new_tokens, None)
        out["generate_s"] = time.perf_counter() - t
        out["tokens"] = len(tokens)
        out["language_phase_gb"] = (mx.get_peak_memory() - lm) / GB
        out["kv_gb"] = memory.kv_cache_bytes(cfg.text, memory.CAPTION_PROMPT_TOKENS + new_tokens, dtype) / GB
        del model, cap, emb
    gc.collect()
    mx.clear_cache()
    out["after_close_gb"] = (mx.get_active_memory() - held) / GB
    return out


def caption_stage(size: str, dtype: mx.Dtype, layers: tuple[int, ...] = (2, 3), bits: int = 4,
                  new_tokens: int = 4) -> tuple[float, int]:
    """(seconds measured, bytes above the language model's weights at the real depth with 512 new tokens):
    the larger of the vision phase (tower + its activations; does not depend on the depth) and the language
    phase (KV cache from mlx-lm's rule at the real depth + the prefill temporaries measured here)."""
    full = LlavaConfig.llava_v15(size)
    seconds, vision, transient = 0.0, 0.0, 0.0
    for n in layers:
        r = run(size, bits, n, new_tokens, dtype)
        seconds += r["vision_s"] + r["generate_s"]
        vision = max(vision, r['vision_phase_gb'])
        transient = max(transient, r['language_phase_gb'] - r["kv_gb"])
        print(f"  LLaVA {size} with {n} layer(s), {bits}-bit LM, {dtype}: LM {r['lm_gb']:.2f} GB, vision tower + "
              f"projector {r['vision_gb']:.2f} GB | above the LM: vision phase {r['vision_phase_gb']:.3f} GB, "
              f"language phase {r['language_phase_gb']:.3f} GB (KV {r['kv_gb']:.3f} GB) | left after close "
              f"{r['after_close_gb']:.3f} GB | vision {r['vision_s']:.1f} s, {r['tokens']} tokens in "
              f"{r['generate_s']:.1f} s", flush=True)
    kv = memory.kv_cache_bytes(full.text, memory.CAPTION_PROMPT_TOKENS + MAX_NEW_TOKENS, dtype) / GB
    print(f"  at {full.text.num_hidden_layers} layers and {MAX_NEW_TOKENS} new tokens: KV {kv:.2f} GB + prefill "
          f"temporaries {transient:.2f} GB, vision phase {vision:.2f} GB", flush=True)
    return seconds, int(max(vision, kv + transient) * GB)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(LLAVA_V15_SIZES), default="7b")
    ap.add_argument("--bits", type=int, choices=(4, 8), default=4)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--dtype", choices=("float16", "float32"),
                    help="default: as Captioner.load chooses (float16 on a GPU, float32 on CPU)")
    args = ap.parse_args()
    gpu = mx.default_device() == mx.gpu
    dtype = {"float16": mx.float16, "float32": mx.float32}[args.dtype or ("float16" if gpu else "float32")]
    print(f"LLaVA-1.5-{args.size}, {args.bits}-bit LM, {dtype}, device {mx.default_device()}")
    seconds, above = caption_stage(args.size, dtype, tuple(args.layers), args.bits, args.new_tokens)
    weights, planned = memory.captioner_stage(args.size, dtype)
    print(f"caption stage: language model {weights / GB:.2f} GB (exact, real depth) + {above / GB:.2f} GB = "
          f"{(weights + above) / GB:.2f} GB; planner {(weights + planned) / GB:.2f} GB "
          f"({(weights + planned) / (weights + above) - 1:+.1%}); {seconds:.1f} s measured")


if __name__ == "__main__":
    main()
