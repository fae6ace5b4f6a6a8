"""Group `text`: tokenizers, both text encoders, the conditioner and prepare_condition.

The prompts of each fixture are read from the `inputs` record of index.json (`text = "..."`, or
`p = [...]` for text_prepare_condition), so the same handler replays any prompt the generator used.
"""

from __future__ import annotations

import json
import re

import mlx.core as mx
import numpy as np

from .. import CaseNotImplemented, Comparison, Context, Fixture, compare, compare_exact


def _conditioner(ctx: Context):
    from ...models.conditioner import Conditioner

    return ctx.component("text.conditioner", lambda: Conditioner(ctx.config()), "conditioner.")


def _inputs(ctx: Context, fixture: Fixture) -> str:
    def load():
        entries = json.loads((ctx.root / "index.json").read_text())
        return {e["file"]: e["inputs"] for e in entries}

    rel = fixture.path.relative_to(ctx.root).as_posix()
    index = ctx.cached("text.index", load)
    if rel not in index:
        raise CaseNotImplemented(f"{rel} is not listed in index.json")
    return index[rel]


def _parse(inputs: str, pattern: str):
    m = re.search(pattern, inputs)
    if m is None:
        raise CaseNotImplemented(f"cannot read the prompt from inputs {inputs[:60]!r}")
    return json.loads(m.group(1))


def run(fixture: Fixture, ctx: Context) -> list[Comparison]:
    rtol = ctx.rtol("text")
    cond = _conditioner(ctx)
    inputs = _inputs(ctx, fixture)
    if "c_crossattn" in fixture:
        return _prepare_condition(fixture, cond, _parse(inputs, r"\bp = (\[.*?\]);"), ctx, rtol)

    text = _parse(inputs, r'^text = (".*")$')
    ids_l, ids_g = cond.tokenize([text])
    crossattn, vector = cond([text])
    states = cond.embedders[0].transformer(ids_l)
    width_l = states[0].shape[-1]
    width_g = cond.embedders[1].model.config.embed_dim
    return [
        compare_exact("clip_l_ids", np.array(ids_l), fixture["clip_l_ids"]),
        compare_exact("openclip_ids", np.array(ids_g), fixture["openclip_ids"]),
        compare("clip_l_hidden", np.array(crossattn[..., :width_l]), fixture["clip_l_hidden"], rtol),
        compare("clip_l_all_hidden_states", np.array(mx.stack(states)), fixture["clip_l_all_hidden_states"], rtol),
        compare("openclip_penultimate", np.array(crossattn[..., width_l:]), fixture["openclip_penultimate"], rtol),
        compare("openclip_pooled", np.array(vector[:, :width_g]), fixture["openclip_pooled"], rtol),
    ]


def _prepare_condition(fixture: Fixture, cond, captions: list[str], ctx: Context, rtol: float) -> list[Comparison]:
    from ...models.conditioner import size_embedding

    config = ctx.config()
    (c_x, c_y), (uc_x, uc_y) = cond.prepare_condition(captions, config.positive_prompt, config.negative_prompt)
    # The control latent is passed through untouched; what the pipeline holds is its NHWC copy.
    control = np.array(mx.array(fixture["z_control"].transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    return [
        compare("c_crossattn", np.array(c_x), fixture["c_crossattn"], rtol),
        compare("c_vector", np.array(c_y), fixture["c_vector"], rtol),
        compare("uc_crossattn", np.array(uc_x), fixture["uc_crossattn"], rtol),
        compare("uc_vector", np.array(uc_y), fixture["uc_vector"], rtol),
        compare("c_control", control, fixture["c_control"], 0.0),
        compare("uc_control", control, fixture["uc_control"], 0.0),
        # size_emb_<h>_<w>: the size each embedding was made for is in its key
        *(compare(k, np.array(size_embedding((int(m[1]), int(m[2])))), fixture[k], rtol)
          for k in sorted(fixture.tensors) if (m := re.fullmatch(r"size_emb_(\d+)_(\d+)", k))),
    ]
