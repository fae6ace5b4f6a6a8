"""Architecture configs as data.

`SUPIRConfig.sdxl_v0()` holds the real SDXL-base + SUPIR-v0 dimensions (options/SUPIR_v0.yaml);
`SUPIRConfig.from_reference(path)` reads a reference `config.json` (the tiny one in the reference
fixtures); `to_dict`/`from_dict` round-trip the config stored next to converted MLX weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

# The default prompts of options/SUPIR_v0.yaml (YAML folds the line breaks into single spaces).
DEFAULT_POSITIVE_PROMPT = (
    "Cinematic, High Contrast, highly detailed, taken using a Canon EOS R camera, hyper detailed photo - "
    "realistic maximum detail, 32k, Color Grading, ultra HD, extreme meticulous detailing, skin pore detailing, "
    "hyper sharpness, perfect without deformations."
)
DEFAULT_NEGATIVE_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, CG Style, 3D render, "
    "unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, jpeg "
    "artifacts, deformed, lowres, over-smooth"
)


class ConfigError(ValueError):
    """A config file that does not describe a SUPIR architecture."""


@dataclass(frozen=True)
class UNetConfig:
    """SDXL UNet / GLVControl dimensions (shared by both networks)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2)
    num_head_channels: int = 64
    transformer_depth: tuple[int, ...] = (1, 2, 10)
    transformer_depth_middle: int = 10
    context_dim: int = 2048
    adm_in_channels: int = 2816
    use_linear_in_transformer: bool = True
    groupnorm_eps: float = 1e-5
    transformer_norm_eps: float = 1e-6

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4


@dataclass(frozen=True)
class ProjectConfig:
    """SUPIR connectors (LightGLVUNet `project_modules`), lists indexed by control feature 0..9."""

    cond_output_channels: tuple[int, ...] = (320,) * 4 + (640,) * 3 + (1280,) * 3
    project_channels: tuple[int, ...] = (320,) * 4 + (640,) * 3 + (1280,) * 3
    concat_channels: tuple[int, ...] = (320,) * 2 + (640,) * 3 + (1280,) * 4 + (0,)
    cross_attn_insert_idx: tuple[int, ...] = (6, 3)
    sft_hidden: int = 128  # hard-coded nhidden of the official ZeroSFT
    cross_attn_head_dim: int = 64  # hard-coded dim_head of the official ZeroCrossAttn


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    attn_resolutions: tuple[int, ...] = ()
    scale_factor: float = 0.13025
    groupnorm_eps: float = 1e-6

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class CLIPTextConfig:
    """HF CLIPTextModel (CLIP ViT-L/14 text tower), read at hidden_states[layer_idx]."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    layer_idx: int = 11


@dataclass(frozen=True)
class OpenCLIPTextConfig:
    """open_clip text tower (ViT-bigG-14): penultimate hidden state + pooled projection."""

    vocab_size: int = 49408
    width: int = 1280
    heads: int = 20
    layers: int = 32
    mlp_ratio: float = 4.0
    embed_dim: int = 1280
    context_length: int = 77
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class SUPIRConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    project: ProjectConfig = field(default_factory=ProjectConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    clip_l: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    clip_g: OpenCLIPTextConfig = field(default_factory=OpenCLIPTextConfig)
    positive_prompt: str = DEFAULT_POSITIVE_PROMPT
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    num_timesteps: int = 1000

    @staticmethod
    def sdxl_v0() -> "SUPIRConfig":
        """The real SDXL-base + SUPIR-v0 architecture."""
        return SUPIRConfig()

    @property
    def context_dim(self) -> int:
        return self.clip_l.hidden_size + self.clip_g.width

    @property
    def vector_dim(self) -> int:
        # pooled bigG embedding + three size embeddings (2 numbers x 256 each)
        return self.clip_g.embed_dim + 3 * 512

    def to_dict(self) -> dict[str, Any]:
        return {"format": "supir-mlx-config", "version": 1, **asdict(self)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "SUPIRConfig":
        if d.get("format") != "supir-mlx-config":
            raise ConfigError("not a supir-mlx config (missing 'format': 'supir-mlx-config')")
        sub = {
            "unet": UNetConfig,
            "project": ProjectConfig,
            "vae": VAEConfig,
            "clip_l": CLIPTextConfig,
            "clip_g": OpenCLIPTextConfig,
        }
        kwargs: dict[str, Any] = {}
        for f in fields(SUPIRConfig):
            if f.name not in d:
                continue
            v = d[f.name]
            kwargs[f.name] = _build(sub[f.name], v) if f.name in sub else v
        return SUPIRConfig(**kwargs)

    @staticmethod
    def from_reference(path: str | Path) -> "SUPIRConfig":
        """Read a reference-fixture `config.json` (layout of ../shared/reference/tiny/config.json)."""
        d = json.loads(Path(path).read_text())
        return SUPIRConfig.from_reference_dict(d)

    @staticmethod
    def from_reference_dict(d: dict[str, Any]) -> "SUPIRConfig":
        try:
            u = d["unet_and_control"]
            lists = u["lists(scaled XL-base)"]
            depth_mid = u.get("transformer_depth_middle_effective") or u.get("transformer_depth_middle")
            if depth_mid is None:
                depth_mid = u["transformer_depth"][-1]
            unet = UNetConfig(
                in_channels=u["in_channels"],
                out_channels=u["out_channels"],
                model_channels=u["model_channels"],
                channel_mult=tuple(u["channel_mult"]),
                num_res_blocks=u["num_res_blocks"],
                attention_resolutions=tuple(u["attention_resolutions"]),
                num_head_channels=u["num_head_channels"],
                transformer_depth=tuple(u["transformer_depth"]),
                transformer_depth_middle=depth_mid,
                context_dim=u["context_dim"],
                adm_in_channels=u["adm_in_channels"],
                use_linear_in_transformer=u["use_linear_in_transformer"],
            )
            project = ProjectConfig(
                cond_output_channels=tuple(lists["cond_output_channels"]),
                project_channels=tuple(lists["project_channels(after x2)"]),
                concat_channels=tuple(lists["concat_channels"]),
                cross_attn_insert_idx=tuple(lists["cross_attn_insert_idx"]),
                sft_hidden=u.get("ZeroSFT_nhidden", 128),
                cross_attn_head_dim=u.get("ZeroCrossAttn_dim_head", 64),
            )
            v = d["vae"]
            vae = VAEConfig(
                in_channels=v["in_channels"],
                out_ch=v["out_ch"],
                ch=v["ch"],
                ch_mult=tuple(v["ch_mult"]),
                num_res_blocks=v["num_res_blocks"],
                z_channels=v["z_channels"],
                embed_dim=v["embed_dim"],
                attn_resolutions=tuple(v["attn_resolutions"]),
                scale_factor=v["scale_factor"],
                groupnorm_eps=v["groupnorm_eps"],
            )
            cl = _find(d, "clip_l_text")
            clip_l = CLIPTextConfig(
                vocab_size=cl["vocab_size"],
                hidden_size=cl["hidden_size"],
                intermediate_size=cl["intermediate_size"],
                num_hidden_layers=cl["num_hidden_layers"],
                num_attention_heads=cl["num_attention_heads"],
                max_position_embeddings=cl["max_position_embeddings"],
                hidden_act=cl["hidden_act"],
                layer_norm_eps=cl["layer_norm_eps"],
                layer_idx=cl["layer_idx"],
            )
            og = _find(d, "openclip_text")
            clip_g = OpenCLIPTextConfig(
                vocab_size=og["vocab_size"],
                width=og["width"],
                heads=og["heads"],
                layers=og["layers"],
                embed_dim=_find(og, "embed_dim"),
                context_length=og["context_length"],
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"reference config is missing {e}") from None
        return SUPIRConfig(
            unet=unet,
            project=project,
            vae=vae,
            clip_l=clip_l,
            clip_g=clip_g,
            positive_prompt=d.get("p_p", DEFAULT_POSITIVE_PROMPT),
            negative_prompt=d.get("n_p", DEFAULT_NEGATIVE_PROMPT),
        )

    @staticmethod
    def load(path: str | Path) -> "SUPIRConfig":
        """Load either our own config.json or a reference-fixture config.json."""
        d = json.loads(Path(path).read_text())
        if d.get("format") == "supir-mlx-config":
            return SUPIRConfig.from_dict(d)
        return SUPIRConfig.from_reference_dict(d)


def _find(d: dict[str, Any], prefix: str) -> Any:
    """Reference configs annotate some keys, e.g. 'clip_l_text(HF CLIPTextModel)'."""
    for k, v in d.items():
        if k == prefix or k.startswith(prefix + "("):
            return v
    raise KeyError(prefix)


def _build(cls: type, d: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
