"""Text conditioning cost with the full-size random-weight encoders (CLIP ViT-L + OpenCLIP bigG, no download).

    python bench/bench_text.py                 # fp32, 1 caption (+ the negative prompt)
    python bench/bench_text.py --dtype float16 --captions 4

Prints tokenizer time (first call and cached), weight bytes, encode time (first and warm) and MLX's
peak memory for the encode on top of the weights.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from supir_mlx.config import DEFAULT_NEGATIVE_PROMPT, DEFAULT_POSITIVE_PROMPT, SUPIRConfig
from supir_mlx.models.conditioner import Conditioner
from supir_mlx.models.tokenizer import default_tokenizer

CAPTION = (
    "The image shows an elderly fisherman with a weathered face and a grey beard, wearing a knitted wool cap "
    "and a dark coat. He stands on a wooden pier in a small harbour with fishing boats behind him under an "
    "overcast sky; the muted colours and film grain give the photograph a nostalgic, documentary feel. "
)
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=DTYPES, default="float32")
    ap.add_argument("--captions", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    t = time.perf_counter()
    tok = default_tokenizer()
    print(f"tokenizer load            {time.perf_counter() - t:8.3f} s")
    texts = [CAPTION + DEFAULT_POSITIVE_PROMPT] * args.captions + [DEFAULT_NEGATIVE_PROMPT]
    for label in ("tokenize (first)", "tokenize (cached)"):
        t = time.perf_counter()
        tok.tokenize(texts, "hf"), tok.tokenize(texts, "open_clip")
        print(f"{label:25s} {time.perf_counter() - t:8.3f} s  ({len(texts)} prompts, both styles)")

    cond = Conditioner(SUPIRConfig.sdxl_v0())
    cond.update(tree_map(lambda p: p.astype(DTYPES[args.dtype]), cond.parameters()))
    mx.eval(cond.parameters())
    weights = sum(p.nbytes for _, p in tree_flatten(cond.parameters()))
    print(f"weights                   {weights / 1e9:8.3f} GB ({args.dtype})")

    mx.reset_peak_memory()
    base = mx.get_active_memory()
    for i in range(args.repeats):
        t = time.perf_counter()
        c, uc = cond.prepare_condition([CAPTION] * args.captions, DEFAULT_POSITIVE_PROMPT, DEFAULT_NEGATIVE_PROMPT)
        mx.eval(c, uc)
        print(f"encode {'(first)' if i == 0 else '(warm) ':18s} {time.perf_counter() - t:8.3f} s  "
              f"(batch {args.captions + 1} on {mx.default_device()})")
    print(f"encode peak above weights {(mx.get_peak_memory() - base) / 1e9:8.3f} GB")


if __name__ == "__main__":
    main()
