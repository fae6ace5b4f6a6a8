"""Peak memory and time of the caption stage for a full-width LLaVA-1.5 with random quantized weights.

The language model is built directly quantized, one layer at a time (its fp32 random init never exists for more
than one layer), with the real vision tower, projector, vocabulary and prompt length (36 + 576 image features
+ 18 tokens), then asked for the full 512 new tokens (no EOS stop), so the KV cache reaches its largest size.
With `--layers 1 2` (the default) the peak is measured at 1 and 2 decoder layers and extrapolated linearly
to the real depth (weights and KV cache both grow linearly with depth); `--layers 40` measures 13B outright.

MLX's CPU quantized matmul is a plain loop (~0.5 GMAC/s measured here, about 1000 s per 13B layer for the
629-token prefill), so on CPU the prefill multiplies by the dequantized weight instead (`--cpu-dequant`, on by
default there): one matrix at a time exists in fp32 (at most 656 MB, lm_head), so the CPU peak is an upper bound. Decoding
stays on the quantized kernel, so on CPU ask for few new tokens; the KV cache of the full 512 is added from
mlx-lm's allocation rule (steps of 256 positions).

    python bench/bench_captioner.py [--size 13b|7b] [--bits 4|8] [--layers 1 2] [--new-tokens 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import time

import mlx.core as mx
import mlx.nn as nn

from supir_mlx.captioner import TEMPERATURE, TOP_P, generate, make_sampler
from supir_mlx.models.llava import LLAVA_V15_SIZES, LlavaConfig, LlavaModel

GB = 1e9
KV_STEP = 256  # mlx-lm KVCache grows its buffers in steps of this many positions
PROMPT_BEFORE, PROMPT_AFTER = 36, 18  # token counts around the image in SUPIR's request (LLaMA tokenizer)


def build(cfg: LlavaConfig, bits: int, dtype: mx.Dtype) -> LlavaModel:
    model = LlavaModel(cfg)  # lazy: nothing allocated yet
    model.set_dtype(dtype)
    nn.quantize(model.language_model, 64, bits)
    lm = model.language_model
    for part in [model.vision_tower, model.multi_modal_projector, lm.model.embed_tokens, *lm.model.layers, lm.model.norm, lm.lm_head]:
        mx.eval(part.parameters())
        mx.clear_cache()
    return model


def dequantizing_prefill() -> None:
    """CPU measurement aid: many-row products go through the dequantized weight and BLAS."""
    quantized_call = nn.QuantizedLinear.__call__

    def call(self, x):
        if x.shape[-2] == 1:
            return quantized_call(self, x)
        w = mx.dequantize(self.weight, self.scales, self.biases, self.group_size, self.bits)
        y = x @ w.T
        mx.eval(y)  # else the lazy graph dequantizes every layer's weights up front
        return y + self.bias if "bias" in self else y

    nn.QuantizedLinear.__call__ = call


def kv_bytes(cfg: LlavaConfig, positions: int, dtype: mx.Dtype) -> int:
    slots = -(-positions // KV_STEP) * KV_STEP
    t = cfg.text
    return 2 * t.num_hidden_layers * slots * t.num_key_value_heads * (t.head_dim or t.hidden_size // t.num_attention_heads) * dtype.size


def run(size: str, bits: int, layers: int, new_tokens: int, dtype: mx.Dtype) -> dict[str, float]:
    base = LlavaConfig.llava_v15(size)
    cfg = dataclasses.replace(base, text=dataclasses.replace(base.text, num_hidden_layers=layers, layer_types=None))
    mx.clear_cache()
    mx.reset_peak_memory()
    t = time.perf_counter()
    model = build(cfg, bits, dtype)
    out = {"build_s": time.perf_counter() - t, "weights_gb": mx.get_active_memory() / GB}
    key = mx.random.key(0)
    pixels = mx.random.normal((1, 336, 336, 3), key=key)
    ids = mx.random.randint(3, 32000, (PROMPT_BEFORE + PROMPT_AFTER,), key=key).tolist()
    mx.reset_peak_memory()
    t = time.perf_counter()
    features = model.image_features(pixels)[0]
    emb = model.embed(ids[:PROMPT_BEFORE], features, ids[PROMPT_BEFORE:])
    mx.eval(emb)
    out["vision_s"] = time.perf_counter() - t
    t = time.perf_counter()
    tokens = generate(model, emb, make_sampler(TEMPERATURE, TOP_P, 0), new_tokens, None)
    out["generate_s"] = time.perf_counter() - t
    out["tokens"] = len(tokens)
    out["caption_peak_gb"] = mx.get_peak_memory() / GB
    del model, features, emb
    gc.collect()
    mx.clear_cache()
    out["after_close_gb"] = mx.get_active_memory() / GB
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(LLAVA_V15_SIZES), default="13b")
    ap.add_argument("--bits", type=int, choices=(4, 8), default=4)
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--cpu-dequant", action=argparse.BooleanOptionalAction, default=mx.default_device() == mx.cpu)
    args = ap.parse_args()
    dtype = mx.float16 if mx.default_device() == mx.gpu else mx.float32  # as Captioner.load chooses
    if args.cpu_dequant:
        dequantizing_prefill()
    depth = LLAVA_V15_SIZES[args.size][1]
    print(f"LLaVA-1.5-{args.size}, {args.bits}-bit LM, {dtype}, device {mx.default_device()}")
    rows = {}
    for n in args.layers:
        r = rows[n] = run(args.size, args.bits, n, args.new_tokens, dtype)
        print(f"{n:3d} layers: weights {r['weights_gb']:.2f} GB, caption peak {r['caption_peak_gb']:.2f} GB, "
              f"after close {r['after_close_gb']:.3f} GB | build {r['build_s']:.1f} s, vision {r['vision_s']:.1f} s, "
              f"{r['tokens']} tokens in {r['generate_s']:.1f} s ({r['tokens'] / r['generate_s']:.1f} tok/s)")
    full = LlavaConfig.llava_v15(args.size)
    prompt = PROMPT_BEFORE + full.vision.num_patches + PROMPT_AFTER
    extra_kv = (kv_bytes(full, prompt + 512, dtype) - kv_bytes(full, prompt + args.new_tokens, dtype)) / GB
    print(f"KV cache of all {depth} layers: {kv_bytes(full, prompt + 512, dtype) / GB:.2f} GB at {prompt} + 512 positions")
    if len(rows) >= 2 and depth not in rows:
        (a, ra), (b, rb) = sorted(rows.items())[:2]
        for k in ("weights_gb", "caption_peak_gb"):
            slope = (rb[k] - ra[k]) / (b - a)
            print(f"extrapolated to {depth} layers: {k} = {ra[k] + slope * (depth - a):.2f} GB ({slope * 1e3:.0f} MB per layer)")
        peak = ra["caption_peak_gb"] + (rb["caption_peak_gb"] - ra["caption_peak_gb"]) / (b - a) * (depth - a)
        print(f"caption stage peak for 512 new tokens: {peak + extra_kv:.2f} GB (extrapolated peak + {extra_kv:.2f} GB more KV)")


if __name__ == "__main__":
    main()
