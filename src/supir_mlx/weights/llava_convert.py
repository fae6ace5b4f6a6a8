"""Convert LLaVA-1.5 checkpoints once into an MLX folder with a quantized language model.

Two source layouts are read (safetensors):
- llava-hf (`llava-hf/llava-1.5-{7,13}b-hf`): `language_model.*`, `vision_tower.*`, `multi_modal_projector.*`
  with `config.json` (model_type llava, text_config, vision_config) and the tokenizer files beside them;
- the original release (`liuhaotian/llava-v1.5-{7,13}b`): `model.*` + `lm_head.*` with the projector at
  `model.mm_projector.{0,2}`, plus the separate `openai/clip-vit-large-patch14-336` tower (`clip=`), whose
  text half is not used.
The output (`config.json` with `quantization`, `model-NNNNN.safetensors`, tokenizer files) is what
`models.llava.load_llava` reads. Tensors are read, mapped and quantized one at a time and written in
shards, so converting 13B never holds more than one shard plus one fp32 tensor.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterable

import mlx.core as mx
from mlx.utils import tree_flatten

from ..config import ConfigError
from ..models.clip_vision import CLIPVisionConfig
from ..models.llava import HF_LLAMA_DEFAULTS, LlavaConfig, LlavaModel, kept, load_strict, mlx_layout
from .checkpoint import CheckpointError, read_checkpoint
from .loading import WeightError

# The original release's key prefixes -> llava-hf names (first match wins, so the projector and the
# tower come before the catch-all `model.`).
ORIGINAL_PREFIXES = (
    ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
    ("model.vision_tower.vision_tower.", "vision_tower."),
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
ORIGINAL_IMAGE_TOKEN = -200  # the placeholder id of the original code (not in its 32000-token vocabulary)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
SHARD_BYTES = 2 << 30


def default_llava_dir(size: str = "13b", bits: int = 4) -> Path:
    """Where the converted captioner lives unless told otherwise (SUPIR_MLX_HOME, else ~/.cache/supir-mlx)."""
    home = os.environ.get("SUPIR_MLX_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "supir-mlx") / f"llava-v1.5-{size}-mlx-{bits}bit"


def check_llava_folder(path: str | Path) -> LlavaConfig:
    """A converted captioner folder checked without reading its weights: config.json describing LLaVA,
    weight shards with intact headers, tokenizer files. Returns its config; raises ValueError (one line naming
    the folder and what is wrong)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a folder; give a folder written by `supir-mlx convert-llava`")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{path}: no config.json; not a converted captioner folder (see `supir-mlx convert-llava`)")
    try:
        cfg = LlavaConfig.from_dict(json.loads(cfg_file.read_text()))
    except OSError as e:
        raise ConfigError(f"{path}: config.json cannot be read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{path}: config.json is corrupt (not JSON); convert the captioner again") from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ConfigError(f"{path}: config.json does not describe a LLaVA captioner ({e})") from None
    shards = sorted(path.glob("model*.safetensors"))
    if not shards:
        raise ConfigError(f"{path}: no model*.safetensors weight files; convert the captioner again")
    for f in shards:
        try:
            read_checkpoint(f)
        except (CheckpointError, OSError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).removeprefix(f"{f.name}: ")
            raise ConfigError(f"{path}: {f.name} cannot be read ({reason}); convert the captioner again") from None
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise ConfigError(f"{path}: no tokenizer (tokenizer.json or tokenizer.model); convert the captioner again")
    return cfg


def quantized_nbytes(shape: tuple[int, int], bits: int, group_size: int, scale_bytes: int = 2) -> int:
    """Bytes of one affine-quantized [out, in] matrix: packed weights + one scale and one bias per group."""
    out, inp = shape
    return out * inp * bits // 8 + 2 * out * (inp // group_size) * scale_bytes


def _files(path: Path) -> list[Path]:
    """The checkpoint files of a folder (safetensors preferred, else PyTorch .bin) or the one file given."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if not files:
            raise WeightError(f"no .safetensors or .bin checkpoint files in {path}")
        return files
    if not path.is_file():
        raise WeightError(f"{path}: no such file")
    return [path]


def _config_json(path: Path, config: Path | None = None) -> dict:
    f = config or (path if path.is_dir() else path.parent) / "config.json"
    if not f.is_file():
        raise ConfigError(f"no config.json beside {path}" if config is None else f"{config}: no such file")
    return json.loads(f.read_text())


def _original_config(d: dict, clip: dict) -> LlavaConfig:
    """The original release's flat LLaMA config + mm_* fields, with the CLIP tower's own config."""
    if d.get("mm_projector_type") != "mlp2x_gelu" or d.get("mm_vision_select_feature", "patch") != "patch":
        raise ConfigError("only the LLaVA-1.5 projector (mlp2x_gelu) on patch features is supported")
    text = {k: d[k] for k in HF_LLAMA_DEFAULTS if k in d} | {"num_key_value_heads": d.get("num_key_value_heads")}
    return LlavaConfig.from_dict({
        "model_type": "llava",
        "text_config": {**text, "model_type": "llama"},
        "vision_config": clip.get("vision_config", clip),  # a CLIPModel config nests it; a CLIPVisionModel's is flat
        "image_token_index": ORIGINAL_IMAGE_TOKEN,
        "vision_feature_layer": d.get("mm_vision_select_layer", -2),
    })


Source = dict[str, tuple[Path, str, tuple[int, ...]]]  # llava-hf name -> (file, key in it, shape)


def open_source(source: Path, clip: Path | None, config: Path | None = None) -> tuple[LlavaConfig, Source, Path]:
    """Config (`config`, else config.json beside the weights), tensor index (from the file headers only) and
    the folder holding the tokenizer."""
    def keys(files: Iterable[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
        out = {}
        for f in files:
            ckpt = read_checkpoint(f)  # safetensors or a torch pickle (.bin), read safely and lazily
            out.update({k: (f, ckpt.shape(k)) for k in ckpt})
        return out

    src = keys(_files(source))
    folder = source if source.is_dir() else source.parent
    if any(k.startswith("language_model.") for k in src):
        return LlavaConfig.from_dict(_config_json(source, config)), {k: (f, k, s) for k, (f, s) in src.items()}, folder
    if "model.embed_tokens.weight" not in src:
        raise WeightError(f"{source}: neither the llava-hf nor the original LLaVA layout (no language model keys)")
    names = {}
    for k, (f, s) in src.items():
        new = next((n + k[len(p) :] for p, n in ORIGINAL_PREFIXES if k.startswith(p)), None)
        if new is None:
            raise WeightError(f"unexpected key '{k}' in {f.name}")
        names[new] = (f, k, s)
    has_tower = any(n.startswith("vision_tower.") for n in names)
    if not has_tower and clip is None:
        raise WeightError(f"{source} has no vision tower: give the openai/clip-vit-large-patch14-336 checkpoint (clip=)")
    clip_cfg = asdict(CLIPVisionConfig())  # mm_vision_tower of LLaVA-1.5 is always CLIP ViT-L/14-336
    if clip is not None:
        clip_cfg = _config_json(clip)
        for k, (f, s) in keys(_files(clip)).items():
            if k.startswith("vision_model."):  # the CLIPModel text half and projections are not LLaVA's
                names["vision_tower." + k] = (f, k, s)
    return _original_config(_config_json(source, config), clip_cfg), names, folder


def convert_llava(
    source: str | Path,
    out: str | Path,
    *,
    clip: str | Path | None = None,
    config: str | Path | None = None,
    bits: int | None = 4,
    group_size: int = 64,
    dtype: mx.Dtype = mx.float16,
    overwrite: bool = False,
) -> Path:
    """Convert a local LLaVA-1.5 checkpoint (folder or .safetensors file) into the MLX folder `out`.

    The language model's Linear and Embedding weights are quantized (`bits` 4 or 8, group `group_size`;
    None keeps them in `dtype`); the vision tower and projector stay in `dtype`. The folder appears only
    when complete (written as `<out>.partial`, then renamed)."""
    source, out = Path(source).expanduser(), Path(out).expanduser()
    if bits not in (None, 4, 8):
        raise ValueError(f"bits must be 4, 8 or None, not {bits}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True to replace it)")
    cfg, names, folder = open_source(source, _path(clip), _path(config))
    tok = [folder / f for f in TOKENIZER_FILES if (folder / f).is_file()]
    if not any(f.name in ("tokenizer.json", "tokenizer.model") for f in tok):
        raise WeightError(f"no tokenizer (tokenizer.json or tokenizer.model) in {folder}")
    names = {k: v for k, v in names.items() if kept(cfg, k)}
    _check(cfg, names)
    if bits:
        cfg = replace(cfg, quantization={"group_size": group_size, "bits": bits})

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shard: dict[str, mx.array] = {}
    n_shards = 0

    def flush() -> None:
        nonlocal n_shards, shard
        if shard:
            n_shards += 1
            mx.save_safetensors(str(tmp / f"model-{n_shards:05d}.safetensors"), shard, metadata={"format": "mlx"})
            shard = {}
            mx.clear_cache()

    handles = {f: read_checkpoint(f) for f, _, _ in names.values()}
    for name in sorted(names):
        f, key, _ = names[name]
        v = mlx_layout(cfg, name, mx.array(handles[f][key])).astype(dtype)
        if bits and _quantized(name, v, group_size):
            w, scales, biases = mx.quantize(v, group_size, bits)
            base = name[: -len("weight")]
            entries = {name: w, base + "scales": scales, base + "biases": biases}
        else:
            entries = {name: v}
        mx.eval(entries)
        handles[f].release(key)
        shard.update(entries)
        if sum(a.nbytes for a in shard.values()) >= SHARD_BYTES:
            flush()
    flush()
    (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    for f in tok:
        shutil.copyfile(f, tmp / f.name)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _path(p: str | Path | None) -> Path | None:
    return Path(p).expanduser() if p else None


def _quantized(name: str, v: mx.array, group_size: int) -> bool:
    """What nn.quantize would quantize in the language model: Linear and Embedding weights whose rows split
    into whole groups (norm weights are 1-D)."""
    return name.startswith("language_model.") and v.ndim == 2 and v.shape[-1] % group_size == 0


def _check(cfg: LlavaConfig, names: Source) -> None:
    """Names and shapes from the file headers against the architecture, before any tensor is read."""
    expected = {k: v.shape for k, v in tree_flatten(LlavaModel(cfg).parameters())}  # lazy: nothing allocated
    for problem, ks in (("unexpected", sorted(set(names) - set(expected))), ("missing", sorted(set(expected) - set(names)))):
        if ks:
            raise WeightError(f"{problem} key '{ks[0]}'" + (f" (and {len(ks) - 1} more)" if len(ks) > 1 else ""))
    for name, (_, key, shape) in names.items():
        got = tuple(mlx_layout(cfg, name, mx.zeros(shape)).shape)
        if got != tuple(expected[name]):
            raise WeightError(f"shape mismatch for '{key}': checkpoint {shape} -> expected {tuple(expected[name])}")


def load_source(
    source: str | Path, *, clip: str | Path | None = None, config: str | Path | None = None, dtype: mx.Dtype = mx.float32
) -> LlavaModel:
    """A LlavaModel straight from an unconverted checkpoint (either layout), unquantized, for checks."""
    cfg, names, _ = open_source(Path(source), _path(clip), _path(config))
    names = {k: v for k, v in names.items() if kept(cfg, k)}
    _check(cfg, names)
    handles = {f: read_checkpoint(f) for f, _, _ in names.values()}
    weights = {name: mlx_layout(cfg, name, mx.array(handles[f][key])).astype(dtype) for name, (f, key, _) in names.items()}
    model = LlavaModel(cfg)
    load_strict(model, weights)
    model.eval()
    return model
