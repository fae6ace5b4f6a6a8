"""Strict loading of official-layout weights into the MLX modules.

The MLX module tree is named like the official one, so an official key is the MLX parameter path;
only layouts change: Conv2d weights go from [out, in, kh, kw] to MLX's [out, kh, kw, in], and a
1x1 convolution that we implement as `nn.Linear` drops its trailing 1x1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

# Official state-dict entries that carry no parameter of ours: training-only tensors, buffers we compute.
IGNORED_KEYS = {
    "denoiser.sigmas",  # DDPM sigma table, recomputed from the schedule
    "mask_LQ",  # training-only tensor of the SUPIR checkpoint
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",  # arange(77) buffer
}
IGNORED_SUFFIXES = (".mask_LQ",)


class WeightError(ValueError):
    """A checkpoint that does not fit the architecture (missing, unexpected or mis-shaped key)."""


def is_ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.endswith(IGNORED_SUFFIXES)


def to_mlx_layout(key: str, value: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """Bring one official tensor into the layout of the MLX parameter it fills."""
    if value.ndim == 4 and len(target_shape) == 4:
        value = value.transpose(0, 2, 3, 1)
    elif value.ndim == 4 and len(target_shape) == 2 and value.shape[2:] == (1, 1):
        value = value.reshape(value.shape[0], value.shape[1])
    if tuple(value.shape) != tuple(target_shape):
        raise WeightError(f"shape mismatch for '{key}': checkpoint {tuple(value.shape)} -> expected {tuple(target_shape)}")
    return value


def load_official(
    module: nn.Module,
    weights: Mapping[str, np.ndarray],
    prefix: str = "",
    dtype: mx.Dtype = mx.float32,
    strict: bool = True,
) -> nn.Module:
    """Load official-layout `weights` whose keys start with `prefix` into `module` (strictly).

    Every parameter of `module` must receive exactly one tensor of the right shape, and every
    non-ignored key under `prefix` must name a parameter.
    """
    params = dict(tree_flatten(module.parameters()))
    loaded: dict[str, mx.array] = {}
    unexpected: list[str] = []
    for key, value in weights.items():
        if not key.startswith(prefix) or is_ignored(key):
            continue
        name = key[len(prefix) :]
        if name not in params:
            unexpected.append(key)
            continue
        arr = to_mlx_layout(key, np.asarray(value), params[name].shape)
        loaded[name] = mx.array(arr).astype(dtype)
    if strict:
        missing = sorted(set(params) - set(loaded))
        if unexpected:
            raise WeightError(f"unexpected key '{unexpected[0]}'" + _more(unexpected))
        if missing:
            raise WeightError(f"missing key '{prefix}{missing[0]}'" + _more(missing))
    module.update(tree_unflatten(list(loaded.items())))
    return module


def _more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def read_weights(paths: Iterable[str | Path]) -> dict[str, np.ndarray]:
    """Read official checkpoints in the official order (later files override earlier keys)."""
    from .checkpoint import read_checkpoint

    merged: dict[str, np.ndarray] = {}
    for p in paths:
        merged.update(read_checkpoint(p))
    return merged


def load_supir_model(config, paths: Iterable[str | Path], dtype: mx.Dtype = mx.float32):
    """Build a SUPIRModel and load it strictly from official-layout checkpoint files."""
    from ..models.supir import SUPIRModel

    model = SUPIRModel(config)
    load_official(model, read_weights(paths), dtype=dtype)
    model.eval()
    return model
