"""SDXL text conditioning (sgm GeneralConditioner as SUPIR configures it).

    embedders.0.transformer   CLIP ViT-L text, read at hidden_states[layer_idx] (before the final norm)
    embedders.1.model         OpenCLIP bigG text: penultimate state + pooled projection

crossattn = cat(CLIP-L hidden, bigG penultimate) on the channel axis; vector = cat(bigG pooled,
E(original size), E(crop top-left), E(target size)), where E embeds each number sinusoidally in 256
channels. SUPIR always passes (1024, 1024), (0, 0), (1024, 1024), whatever the image size. The official
list goes on with the three parameter-free size embedders; here they are `size_embedding`.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import mlx.nn as nn

from ..config import CLIPTextConfig, OpenCLIPTextConfig, SUPIRConfig
from .clip import CLIPTextModel, OpenCLIPTextModel
from .layers import timestep_embedding
from .tokenizer import CLIPTokenizer, default_tokenizer

SIZE_CONDITIONS = ((1024, 1024), (0, 0), (1024, 1024))  # original size, crop top-left, target size
SIZE_EMBED_DIM = 256  # per number


def size_embedding(pair: tuple[int, int]) -> mx.array:
    """[1, 512] = [cos(a f), sin(a f), cos(b f), sin(b f)] (sgm ConcatTimestepEmbedderND, outdim 256)."""
    return timestep_embedding(mx.array(pair), SIZE_EMBED_DIM).reshape(1, -1)


class FrozenCLIPEmbedder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.transformer = CLIPTextModel(cfg)

    def __call__(self, ids: mx.array) -> mx.array:
        return self.transformer(ids, num_layers=self.transformer.config.layer_idx)[-1]


class FrozenOpenCLIPEmbedder2(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.model = OpenCLIPTextModel(cfg)

    def __call__(self, ids: mx.array) -> tuple[mx.array, mx.array]:
        return self.model(ids)


class Conditioner(nn.Module):
    def __init__(self, config: SUPIRConfig, tokenizer: CLIPTokenizer | None = None):
        super().__init__()
        self.embedders = [FrozenCLIPEmbedder(config.clip_l), FrozenOpenCLIPEmbedder2(config.clip_g)]
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> CLIPTokenizer:
        """The given tokenizer, else the one of the merge list shipped with the package."""
        return self._tokenizer or default_tokenizer()

    def tokenize(self, texts: Sequence[str]) -> tuple[mx.array, mx.array]:
        """Token ids [B, 77] for encoder 1 (transformers style) and encoder 2 (open_clip style)."""
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
            raise ValueError("texts must be a non-empty list of strings")
        tok = self.tokenizer
        return mx.array(tok.tokenize(texts, "hf")), mx.array(tok.tokenize(texts, "open_clip"))

    def __call__(self, texts: Sequence[str]) -> tuple[mx.array, mx.array]:
        """(crossattn [B, 77, D_l + D_g], vector [B, pooled + 1536]) for a batch of prompts."""
        ids_l, ids_g = self.tokenize(texts)
        clip_l, open_clip = self.embedders
        hidden = clip_l(ids_l)
        penultimate, pooled = open_clip(ids_g)
        sizes = mx.concatenate([size_embedding(p) for p in SIZE_CONDITIONS], axis=-1).astype(pooled.dtype)
        vector = mx.concatenate([pooled, mx.repeat(sizes, len(texts), axis=0)], axis=-1)
        return mx.concatenate([hidden, penultimate], axis=-1), vector

    def prepare_condition(
        self, captions: Sequence[str], positive: str, negative: str
    ) -> tuple[tuple[mx.array, mx.array], tuple[mx.array, mx.array]]:
        """((c_crossattn, c_vector), (uc_crossattn, uc_vector)) for one sample per caption.

        As the official SUPIRModel.prepare_condition: the positive text is `caption + positive` (plain
        concatenation, nothing inserted), the negative text is `negative` for every sample and is really
        encoded (never zeroed). The negative is the same for every sample, so it is encoded once.
        """
        if isinstance(captions, str) or not isinstance(captions, Sequence) or not captions:
            raise ValueError("captions must be a non-empty list of strings")
        if not all(isinstance(t, str) for t in (*captions, positive, negative)):
            raise ValueError("captions and prompts must be strings")
        n = len(captions)
        crossattn, vector = self([c + positive for c in captions] + [negative])
        uc = (mx.repeat(crossattn[n:], n, axis=0), mx.repeat(vector[n:], n, axis=0))
        return (crossattn[:n], vector[:n]), uc
