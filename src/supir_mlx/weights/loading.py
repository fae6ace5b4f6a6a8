"""Strict loading of official-layout weights into the MLX modules.

The MLX module tree is named like the official one, so an official key is the MLX parameter path;
only layouts change: Conv2d weights go from [out, in, kh, kw] to MLX's [out, kh, kw, in], and a
1x1 convolution that we implement as `nn.Linear` drops its trailing 1x1.

Loading is planned from shapes alone (checkpoint headers and the lazily built module, nothing read),
so a missing, unexpected or mis-shaped key fails before any work; then tensors are converted and
cast one at a time, so peak memory is the model in its target dtype plus one tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .checkpoint import Checkpoint, read_checkpoint

# Official state-dict entries that carry no parameter of ours: training-only tensors, buffers we compute.
IGNORED_KEYS = {
    "denoiser.sigmas",  # DDPM sigma table, recomputed from the schedule
    "mask_LQ",  # training-only tensor of the SUPIR checkpoint
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",  # arange(77) buffer
}
IGNORED_SUFFIXES = (".mask_LQ", ".num_batches_tracked")  # the last: BatchNorm training counters

# Top-level parts of SUPIRModel, by parameter prefix; each gets its own dtype (see component_dtypes).
COMPONENTS = {
    "unet": "model.diffusion_model.",
    "control": "model.control_model.",
    "vae": "first_stage_model.",
    "text": "conditioner.",
}
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class WeightError(ValueError):
    """A checkpoint that does not fit the architecture (missing, unexpected or mis-shaped key)."""


def is_ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.endswith(IGNORED_SUFFIXES)


def parse_dtype(name: str | mx.Dtype) -> mx.Dtype:
    if isinstance(name, mx.Dtype):
        return name
    if name not in DTYPES:
        raise WeightError(f"unknown dtype '{name}' (use one of {', '.join(DTYPES)})")
    return DTYPES[name]


def dtype_name(dtype: mx.Dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def component_dtypes(dtype: str | mx.Dtype) -> dict[str, mx.Dtype]:
    """Per-component dtypes for a requested model dtype.

    The SDXL VAE overflows in float16 (NaNs in the decoder), so it stays in float32 when float16 is
    asked for; bfloat16 has float32's range and is kept.
    """
    dtype = parse_dtype(dtype)
    return {c: (mx.float32 if c == "vae" and dtype == mx.float16 else dtype) for c in COMPONENTS}


def component_of(name: str) -> str:
    for comp, prefix in COMPONENTS.items():
        if name.startswith(prefix):
            return comp
    raise WeightError(f"parameter '{name}' belongs to no component of the SUPIR model")


def mlx_shape(shape: tuple[int, ...], target: tuple[int, ...]) -> tuple[int, ...]:
    """Shape an official tensor takes in the MLX parameter `target` (without reading it)."""
    if len(shape) == 4 and len(target) == 4:
        return (shape[0], shape[2], shape[3], shape[1])
    if len(shape) == 4 and len(target) == 2 and shape[2:] == (1, 1):
        return shape[:2]
    return shape


def to_mlx_layout(key: str, value: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """Bring one official tensor into the layout of the MLX parameter it fills (a view where possible)."""
    shape = mlx_shape(value.shape, tuple(target_shape))
    if shape != tuple(target_shape):
        raise WeightError(f"shape mismatch for '{key}': checkpoint {tuple(value.shape)} -> expected {tuple(target_shape)}")
    if value.ndim == 4 and len(shape) == 4:
        return value.transpose(0, 2, 3, 1)
    return value.reshape(shape)


def _shape(weights: Mapping[str, np.ndarray], key: str) -> tuple[int, ...]:
    # Checkpoints and WeightSets (and any mapping with a `shape(key)` method) answer without a read.
    if callable(getattr(weights, "shape", None)):
        return tuple(weights.shape(key))
    return tuple(np.shape(weights[key]))


def plan(
    params: Mapping[str, tuple[int, ...]], weights: Mapping[str, np.ndarray], prefix: str = "", strict: bool = True
) -> dict[str, str]:
    """{parameter name: official key} for every parameter, checked from shapes only.

    Raises WeightError naming the first unexpected, missing or mis-shaped key (and how many more).
    """
    mapping: dict[str, str] = {}
    unexpected: list[str] = []
    mis_shaped: list[str] = []
    for key in weights:
        if not key.startswith(prefix) or is_ignored(key):
            continue
        name = key[len(prefix) :]
        if name not in params:
            unexpected.append(key)
            continue
        shape = _shape(weights, key)
        if mlx_shape(shape, tuple(params[name])) != tuple(params[name]):
            mis_shaped.append(f"shape mismatch for '{key}': checkpoint {shape} -> expected {tuple(params[name])}")
        mapping[name] = key
    if mis_shaped:
        raise WeightError(mis_shaped[0] + _more(mis_shaped))
    if strict:
        if unexpected:
            raise WeightError(f"unexpected key '{unexpected[0]}'" + _more(unexpected))
        missing = sorted(set(params) - set(mapping))
        if missing:
            raise WeightError(f"missing key '{prefix}{missing[0]}'" + _more(missing))
    return mapping


def convert_tensor(key: str, value: np.ndarray, target_shape: tuple[int, ...], dtype: mx.Dtype) -> mx.array:
    """One official tensor as an evaluated MLX array in MLX layout; floats are cast to `dtype`."""
    arr = mx.array(np.asarray(to_mlx_layout(key, np.asarray(value), target_shape), order="C"))
    if mx.issubdtype(arr.dtype, mx.floating):
        arr = arr.astype(dtype)
    mx.eval(arr)  # now, so the float32/source copy is freed before the next tensor
    return arr


def load_official(
    module: nn.Module,
    weights: Mapping[str, np.ndarray],
    prefix: str = "",
    dtype: mx.Dtype | Mapping[str, mx.Dtype] = mx.float32,
    strict: bool = True,
) -> nn.Module:
    """Load official-layout `weights` whose keys start with `prefix` into `module` (strictly).

    Every parameter of `module` must receive exactly one tensor of the right shape, and every
    non-ignored key under `prefix` must name a parameter. `dtype` is one dtype, or a mapping from
    parameter-name prefix to dtype (see component_dtypes) for a whole SUPIRModel.
    """
    params = {name: tuple(p.shape) for name, p in tree_flatten(module.parameters())}
    mapping = plan(params, weights, prefix, strict)
    loaded = []
    for name, key in mapping.items():
        loaded.append((name, convert_tensor(key, weights[key], params[name], _dtype_for(name, dtype))))
        release(weights, key)
    module.update(tree_unflatten(loaded))
    return module


def release(weights: Mapping[str, np.ndarray], key: str) -> None:
    """Let a memory-mapped checkpoint drop the pages of a tensor that has been converted."""
    if callable(getattr(weights, "release", None)):
        weights.release(key)


def _dtype_for(name: str, dtype: mx.Dtype | Mapping[str, mx.Dtype]) -> mx.Dtype:
    if isinstance(dtype, mx.Dtype):
        return dtype
    return dtype[component_of(name)]


def _more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


class WeightSet(Mapping[str, np.ndarray]):
    """Several checkpoints seen as one, in the official loading order: a later file overrides earlier keys.

    Nothing is read until a tensor is asked for; `shape(key)` and `source(key)` need no read.
    """

    def __init__(self, checkpoints: Iterable[Checkpoint]):
        self.checkpoints = list(checkpoints)
        self._owner: dict[str, Checkpoint] = {}
        for ck in self.checkpoints:
            self._owner.update(dict.fromkeys(ck, ck))

    def __getitem__(self, key: str) -> np.ndarray:
        return self._owner[key][key]

    def __iter__(self):
        return iter(self._owner)

    def __len__(self) -> int:
        return len(self._owner)

    def __contains__(self, key: object) -> bool:
        return key in self._owner

    def shape(self, key: str) -> tuple[int, ...]:
        return self._owner[key].shape(key)

    def dtype(self, key: str) -> str:
        return self._owner[key].dtype(key)

    def release(self, key: str) -> None:
        self._owner[key].release(key)

    def source(self, key: str) -> Path:
        return self._owner[key].path


def read_weights(paths: Iterable[str | Path]) -> WeightSet:
    """Official checkpoints in the official order (SDXL first, then SUPIR: later files override earlier keys)."""
    return WeightSet(read_checkpoint(p) for p in paths)


def load_supir_model(config, paths: Iterable[str | Path], dtype: str | mx.Dtype = mx.float32):
    """Build a SUPIRModel and load it strictly from official-layout checkpoint files.

    `dtype` is the model dtype; the VAE never runs in float16 (see component_dtypes).
    """
    from ..models.supir import SUPIRModel

    model = SUPIRModel(config)
    load_official(model, read_weights(paths), dtype=component_dtypes(dtype))
    model.eval()
    return model
