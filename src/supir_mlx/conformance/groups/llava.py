"""Group `llava`: the tiny llava-hf LlavaForConditionalGeneration (transformers) against our MLX LLaVA.

Checks our CLIP preprocessing of the fixture image, the projected image features, the logits of one
forward over ids with the image tokens already expanded, and greedy generation token for token.
"""

from __future__ import annotations

import numpy as np

from .. import Comparison, Context, Fixture, compare, compare_exact


def run(fixture: Fixture, ctx: Context) -> list[Comparison]:
    from ...captioner import generate, make_sampler
    from ...models.llava import preprocess_image, split_at_image
    from ...weights.llava_convert import load_source

    folder = ctx.root / "llava"
    model = ctx.cached("llava", lambda: load_source(folder / "llava_tiny.safetensors", config=folder / "llava_tiny_config.json"))
    cfg = model.config
    rtol = ctx.rtol(fixture.group)
    ids = fixture["input_ids"][0].tolist()

    pixels = preprocess_image(fixture["image_hwc_uint8"], cfg.vision.image_size)
    features = model.image_features(pixels)
    logits = model(ids, pixels)
    before, after = split_at_image(ids, cfg.image_token_index, cfg.vision.num_patches)
    n_new = fixture["new_ids"].shape[1]
    # the fixture forced exactly n_new tokens (min_new_tokens), so no EOS stop here
    new = generate(model, model.embed(before, features[0], after), make_sampler(0.0, 1.0, 0), n_new, None)
    return [
        compare("pixel_values", np.asarray(pixels).transpose(0, 3, 1, 2), fixture["pixel_values"], rtol),
        compare("image_features", np.asarray(features), fixture["image_features"], rtol),
        compare("logits", np.asarray(logits), fixture["logits"], rtol),
        compare_exact("new_ids", np.array([new]), fixture["new_ids"]),
        compare_exact("generated_ids", np.array([ids + new]), fixture["generated_ids"]),
    ]
