"""CLIP ViT vision tower (HF `CLIPVisionModel` layout), as LLaVA-1.5 reads it.

Module names follow `vision_tower.vision_model.*` of the llava-hf checkpoints. LLaVA takes the hidden
state of an inner layer, never the pooled output, so only the layers up to that one are built: the
unused last layer(s) and `post_layernorm` are dropped when weights are mapped (see `layers_used`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..config import ConfigError
from .clip import ACTIVATIONS, CLIPEncoder
from .layers import LayerNorm


@dataclass(frozen=True)
class CLIPVisionConfig:
    """openai/clip-vit-large-patch14-336 by default."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPVisionConfig":
        """Known fields of an HF `vision_config`; the rest (generation defaults, ids) is ignored."""
        cfg = cls(**{k: v for k, v in d.items() if k in inspect.signature(cls).parameters})
        if cfg.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"unsupported vision hidden_act '{cfg.hidden_act}' (known: {', '.join(ACTIVATIONS)})")
        return cfg

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def layers_used(self, feature_layer: int) -> int:
        """Encoder layers needed for `hidden_states[feature_layer]` (index 0 = embeddings)."""
        n = feature_layer if feature_layer >= 0 else self.num_hidden_layers + 1 + feature_layer
        if not 0 <= n <= self.num_hidden_layers:
            raise ConfigError(f"vision_feature_layer {feature_layer} is outside a {self.num_hidden_layers}-layer tower")
        return n


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = mx.zeros((cfg.hidden_size,))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def __call__(self, pixels: mx.array) -> mx.array:
        x = self.patch_embedding(pixels)  # NHWC in, [B, h, w, C] out
        b, _, _, c = x.shape
        x = x.reshape(b, -1, c)
        cls = mx.broadcast_to(self.class_embedding.astype(x.dtype), (b, 1, c))
        return mx.concatenate([cls, x], axis=1) + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig, num_layers: int):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: HF spelling
        self.encoder = CLIPEncoder(num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size,
                                   cfg.hidden_act, cfg.layer_norm_eps, causal=False)

    def __call__(self, pixels: mx.array) -> mx.array:
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            x = layer(x)
        return x


class CLIPVisionModel(nn.Module):
    """Returns `hidden_states[feature_layer]` of the HF tower for NHWC pixels: [B, 1 + patches, hidden]."""

    def __init__(self, cfg: CLIPVisionConfig, feature_layer: int = -2):
        super().__init__()
        self.vision_model = CLIPVisionTransformer(cfg, cfg.layers_used(feature_layer))

    def __call__(self, pixels: mx.array) -> mx.array:
        return self.vision_model(pixels)
