"""LLaVA-1.5 (the SUPIR captioner): CLIP ViT-L/14-336 tower + 2-layer GELU projector + mlx-lm's Llama.

Module names follow the llava-hf layout (`vision_tower.vision_model.*`, `multi_modal_projector.linear_{1,2}`,
`language_model.model.*`, `language_model.lm_head`), so its checkpoint keys are our parameter paths. The
image enters the language model as 576 projected patch features (`hidden_states[-2][:, 1:]`) spliced into
the prompt embeddings where the image placeholder stands.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from PIL import Image

from ..config import ConfigError
from .clip_vision import CLIPVisionConfig, CLIPVisionModel
from .layers import gelu

# OpenAI CLIP normalisation (CLIPImageProcessor defaults, used by LLaVA-1.5).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# HF LlamaConfig defaults, for `text_config`s that store only what differs (llava-hf 7B does). mlx-lm's own
# defaults differ (it ties embeddings by default), so they must not fill the gaps.
HF_LLAMA_DEFAULTS = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}

# LLaVA-1.5 language models (vicuna-v1.5): hidden, layers, heads, mlp; vision tower and projector are shared.
LLAVA_V15_SIZES = {"7b": (4096, 32, 32, 11008), "13b": (5120, 40, 40, 13824)}
PROJECTOR_ACTS = {"gelu": gelu}


@dataclass(frozen=True)
class LlavaConfig:
    text: llama.ModelArgs
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    image_token_index: int = 32000
    vision_feature_layer: int = -2
    projector_hidden_act: str = "gelu"
    quantization: dict[str, int] | None = None  # {"group_size", "bits"} of the language model, when quantized

    @staticmethod
    def llava_v15(size: str = "13b", vocab_size: int = 32064) -> "LlavaConfig":
        """The real LLaVA-1.5 architecture (llava-hf vocabulary: 32000 + `<image>` + `<pad>`, padded to 64)."""
        if size not in LLAVA_V15_SIZES:
            raise ConfigError(f"unknown LLaVA-1.5 size '{size}' (choose from {', '.join(LLAVA_V15_SIZES)})")
        hidden, layers, heads, mlp = LLAVA_V15_SIZES[size]
        text = {**HF_LLAMA_DEFAULTS, "vocab_size": vocab_size, "hidden_size": hidden, "num_hidden_layers": layers,
                "num_attention_heads": heads, "num_key_value_heads": heads, "intermediate_size": mlp,
                "rms_norm_eps": 1e-5, "max_position_embeddings": 4096}
        return LlavaConfig(text=llama.ModelArgs.from_dict(text))

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "LlavaConfig":
        """A llava-hf `config.json` (or ours, which adds `quantization`)."""
        if d.get("model_type") != "llava" or "text_config" not in d or "vision_config" not in d:
            raise ConfigError("not a LLaVA config (needs model_type 'llava', text_config and vision_config)")
        text = {**HF_LLAMA_DEFAULTS, **{k: v for k, v in d["text_config"].items() if v is not None}}
        if text["model_type"] != "llama":
            raise ConfigError(f"LLaVA language model '{text['model_type']}' is not supported (only llama)")
        act = d.get("projector_hidden_act", "gelu")
        if act not in PROJECTOR_ACTS:
            raise ConfigError(f"unsupported projector_hidden_act '{act}'")
        if d.get("vision_feature_select_strategy", "default") != "default":
            raise ConfigError("only vision_feature_select_strategy 'default' (drop the CLS token) is supported")
        return LlavaConfig(
            text=llama.ModelArgs.from_dict(text),
            vision=CLIPVisionConfig.from_dict(d["vision_config"]),
            image_token_index=d.get("image_token_index", 32000),
            vision_feature_layer=d.get("vision_feature_layer", -2),
            projector_hidden_act=act,
            quantization=d.get("quantization"),
        )

    def to_dict(self) -> dict[str, Any]:
        text = {k: v for k, v in asdict(self.text).items() if k in inspect.signature(llama.ModelArgs).parameters}
        out = {
            "model_type": "llava",
            "text_config": text,
            "vision_config": asdict(self.vision),
            "image_token_index": self.image_token_index,
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": "default",
            "projector_hidden_act": self.projector_hidden_act,
        }
        if self.quantization:
            out["quantization"] = dict(self.quantization)
        return out


class LlavaMultiModalProjector(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.linear_1 = nn.Linear(cfg.vision.hidden_size, cfg.text.hidden_size)
        self.act = PROJECTOR_ACTS[cfg.projector_hidden_act]
        self.linear_2 = nn.Linear(cfg.text.hidden_size, cfg.text.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaModel(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.config = cfg
        self.vision_tower = CLIPVisionModel(cfg.vision, cfg.vision_feature_layer)
        self.multi_modal_projector = LlavaMultiModalProjector(cfg)
        self.language_model = llama.Model(cfg.text)

    def image_features(self, pixels: mx.array) -> mx.array:
        """[B, S, S, 3] normalised pixels -> [B, patches, text hidden] (CLS dropped, then projected)."""
        pixels = pixels.astype(self.vision_tower.vision_model.embeddings.patch_embedding.weight.dtype)
        return self.multi_modal_projector(self.vision_tower(pixels)[:, 1:])

    def embed(self, before: list[int], features: mx.array, after: list[int]) -> mx.array:
        """Prompt embeddings [T, hidden]: token embeddings around the image features of one image."""
        emb = self.language_model.model.embed_tokens
        parts = [emb(mx.array(ids, dtype=mx.int32)) for ids in (before, after)]
        return mx.concatenate([parts[0], features.astype(parts[0].dtype), parts[1]], axis=0)

    def __call__(self, input_ids: list[int], pixels: mx.array) -> mx.array:
        """Logits [1, T, vocab] of one forward over ids holding one run of image tokens (llava-hf style)."""
        before, after = split_at_image(input_ids, self.config.image_token_index, self.config.vision.num_patches)
        h = self.embed(before, self.image_features(pixels)[0], after)
        return self.language_model(mx.zeros((1, 0), dtype=mx.int32), input_embeddings=h[None])

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """llava-hf-named tensors -> our parameters (see `kept` and `mlx_layout`)."""
        return {k: mlx_layout(self.config, k, v) for k, v in weights.items() if kept(self.config, k)}


PATCH_KEY = "vision_tower.vision_model.embeddings.patch_embedding.weight"


def kept(cfg: LlavaConfig, key: str) -> bool:
    """False for what LLaVA never computes: tower layers past the feature layer, `post_layernorm`, and
    position-id / rotary buffers some exports carry."""
    tower = "vision_tower.vision_model."
    if key.startswith(tower + "post_layernorm.") or key.endswith(("position_ids", "rotary_emb.inv_freq")):
        return False
    if key.startswith(tower + "encoder.layers."):
        return int(key.split(".")[4]) < cfg.vision.layers_used(cfg.vision_feature_layer)
    return True


def mlx_layout(cfg: LlavaConfig, key: str, v: mx.array) -> mx.array:
    """The patch convolution goes from PyTorch's [out, in, kh, kw] to MLX's [out, kh, kw, in]."""
    if key == PATCH_KEY and v.shape[1] == cfg.vision.num_channels:
        return v.transpose(0, 2, 3, 1)
    return v


def split_at_image(input_ids: list[int], image_token: int, n: int) -> tuple[list[int], list[int]]:
    """Token ids before and after the one run of `n` image placeholders."""
    ids = [int(i) for i in input_ids]
    pos = [i for i, t in enumerate(ids) if t == image_token]
    if len(pos) != n or pos[-1] - pos[0] != n - 1:
        raise ValueError(f"expected one run of {n} image tokens ({image_token}), found {len(pos)}")
    return ids[: pos[0]], ids[pos[-1] + 1 :]


def preprocess_image(image: Image.Image | np.ndarray, size: int) -> mx.array:
    """CLIPImageProcessor as LLaVA's agent calls it: RGB, shortest side to `size` (PIL bicubic), centre crop,
    /255, OpenAI mean/std. No pad-to-square (the SUPIR agent bypasses it). Returns [1, size, size, 3] fp32."""
    image = to_pil_rgb(image)
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)  # truncation, as transformers' get_resize_output_image_size
    image = image.resize((size, new_long) if w <= h else (new_long, size), Image.BICUBIC)
    w, h = image.size
    top, left = (h - size) // 2, (w - size) // 2
    x = np.asarray(image)[top : top + size, left : left + size]
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)  # transformers rescales in float64
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return mx.array(x[None])


def to_pil_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """A PIL image or a uint8 HxW / HxWx{1,3,4} array, as RGB (alpha dropped, as PIL's convert does)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ValueError(f"expected a uint8 HxWx3 image array, got {image.dtype} {image.shape}")
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image or a uint8 array, got {type(image).__name__}")
    if min(image.size) < 1:
        raise ValueError(f"empty image {image.size}")
    return image.convert("RGB")


def load_llava(path: str | Path, dtype: mx.Dtype = mx.float16) -> LlavaModel:
    """A converted folder (config.json + model*.safetensors, see weights.llava_convert), loaded strictly.

    The language model is quantized as the config says; every float parameter (scales included) is cast to
    `dtype` (fp16 on Apple GPUs, fp32 for CPU checks)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no converted LLaVA weights in {path} (config.json missing)")
    cfg = LlavaConfig.from_dict(json.loads(cfg_file.read_text()))
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in {path}")
    weights: dict[str, mx.array] = {}
    for f in files:
        weights.update(mx.load(str(f)))
    model = LlavaModel(cfg)
    if cfg.quantization:
        q = cfg.quantization
        nn.quantize(model.language_model, q["group_size"], q["bits"],
                    class_predicate=lambda p, m: f"language_model.{p}.scales" in weights)
    load_strict(model, weights)
    model.set_dtype(dtype)
    model.eval()
    mx.eval(model.parameters())
    return model


def load_strict(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """Every parameter filled by one tensor of its shape, no stray key; a one-line error names the first problem."""
    from ..weights.loading import WeightError

    params = dict(tree_flatten(model.parameters()))
    for problem, keys in (("unexpected", sorted(set(weights) - set(params))), ("missing", sorted(set(params) - set(weights)))):
        if keys:
            raise WeightError(f"{problem} key '{keys[0]}'" + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""))
    for k, v in weights.items():
        if v.shape != params[k].shape:
            raise WeightError(f"shape mismatch for '{k}': checkpoint {tuple(v.shape)} -> expected {tuple(params[k].shape)}")
    model.load_weights(list(weights.items()), strict=True)
