"""The two SDXL text encoders, laid out like their official modules so checkpoint keys map by name.

    CLIPTextModel       transformers CLIPTextModel (CLIP ViT-L/14): `text_model.embeddings...`,
                        `text_model.encoder.layers.N...`, `text_model.final_layer_norm`
    OpenCLIPTextModel   open_clip's CLIP text tower (ViT-bigG/14): `token_embedding`, `positional_embedding`,
                        `transformer.resblocks.N...`, `ln_final`, `text_projection`, `logit_scale`

Both are pre-norm transformers with a causal mask and no padding mask (the official encoders see the
padding tokens too).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import CLIPTextConfig, OpenCLIPTextConfig
from .layers import LayerNorm, attention, gelu, quick_gelu

ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu}  # each applied to a fresh Linear output it may overwrite


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        h = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=self.causal)
        return self.out_proj(h)


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported CLIP activation '{act}' (expected one of {', '.join(ACTIVATIONS)})")
        self.act = ACTIVATIONS[act]
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """One layer of the HF CLIP transformer, shared by the text tower (causal) and the vision tower (not)."""

    def __init__(self, dim: int, heads: int, hidden: int, act: str, eps: float, causal: bool):
        super().__init__()
        self.self_attn = CLIPAttention(dim, heads, causal)
        self.layer_norm1 = LayerNorm(dim, eps=eps)
        self.mlp = CLIPMLP(dim, hidden, act)
        self.layer_norm2 = LayerNorm(dim, eps=eps)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def __call__(self, ids: mx.array) -> mx.array:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class CLIPEncoder(nn.Module):
    def __init__(self, num_layers: int, dim: int, heads: int, hidden: int, act: str, eps: float, causal: bool):
        super().__init__()
        self.layers = [CLIPEncoderLayer(dim, heads, hidden, act, eps, causal) for _ in range(num_layers)]


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                                   cfg.intermediate_size, cfg.hidden_act, cfg.layer_norm_eps, causal=True)
        # Loaded so checkpoints map strictly; SDXL reads a hidden state before it, so it is never applied.
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)

    def __call__(self, ids: mx.array, num_layers: int | None = None) -> list[mx.array]:
        """Hidden states of `ids` [B, N]: index 0 = embeddings, index i = output of layer i.

        Only the first `num_layers` layers run (all by default): SDXL needs hidden_states[layer_idx] only.
        """
        layers = self.text_model.encoder.layers
        num_layers = len(layers) if num_layers is None else num_layers
        if not 0 <= num_layers <= len(layers):
            raise ValueError(f"num_layers must be in 0..{len(layers)}, got {num_layers}")
        states = [self.text_model.embeddings(ids)]
        for layer in layers[:num_layers]:
            states.append(layer(states[-1]))
        return states


class OpenCLIPAttention(nn.Module):
    """torch.nn.MultiheadAttention's parameters: one packed q/k/v projection, then out_proj."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = mx.zeros((3 * dim, dim))
        self.in_proj_bias = mx.zeros((3 * dim,))
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        q, k, v = mx.split(mx.addmm(self.in_proj_bias, x, self.in_proj_weight.T), 3, axis=-1)
        return self.out_proj(attention(q, k, v, self.heads, causal=True))


class OpenCLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden)
        self.c_proj = nn.Linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.c_proj(gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = OpenCLIPAttention(cfg.width, cfg.heads)
        self.ln_2 = LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = OpenCLIPMLP(cfg.width, int(cfg.width * cfg.mlp_ratio))

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTransformer(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.resblocks = [ResidualAttentionBlock(cfg) for _ in range(cfg.layers)]


class OpenCLIPTextModel(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = mx.zeros((cfg.context_length, cfg.width))
        self.transformer = OpenCLIPTransformer(cfg)
        self.ln_final = LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.text_projection = mx.zeros((cfg.width, cfg.embed_dim))  # used as x @ P (no transpose, no bias)
        # CLIP's image-text logit temperature: part of the checkpoint, meaningless without the image tower.
        self.logit_scale = mx.array(0.0)

    def __call__(self, ids: mx.array) -> tuple[mx.array, mx.array]:
        """(penultimate [B, N, width], pooled [B, embed_dim]) for `ids` [B, N].

        penultimate = the input of the last block, without ln_final; pooled = ln_final(output of the
        last block) at the end-of-text position (the first argmax of the ids: EOT has the largest id),
        projected by text_projection.
        """
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        *blocks, last = self.transformer.resblocks
        for block in blocks:
            x = block(x)
        penultimate = x
        x = self.ln_final(last(x))
        eot = mx.argmax(ids, axis=-1)
        pooled = x[mx.arange(x.shape[0]), eot] @ self.text_projection
        return penultimate, pooled
