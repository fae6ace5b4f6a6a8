"""The full-size SDXL + SUPIR-v0 model against the official key/shape manifests, without allocating weights.

Building the MLX modules only records their random initialisation lazily (nothing is evaluated here),
so the 4.8 G-parameter model costs a few kilobytes and about a second.
"""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from supir_mlx.config import SUPIRConfig
from supir_mlx.models.supir import SUPIRModel
from supir_mlx.weights.loading import is_ignored, mlx_shape, plan


class Shapes(dict):
    """A checkpoint described by shapes alone, as `plan` reads it."""

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self[key])


@pytest.fixture(scope="module")
def manifests(reference_dir):
    root = reference_dir / "manifests"
    return {name: json.loads((root / f"{name}.json").read_text()) for name in ("sdxl_base_sgm", "supir_model_full", "supir_ckpt_expected")}


@pytest.fixture(scope="module")
def params():
    mx.reset_peak_memory()
    model = SUPIRModel(SUPIRConfig.sdxl_v0())
    shapes = {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}
    assert mx.get_peak_memory() < 1 << 20  # nothing was allocated
    return shapes


def sources(manifests) -> tuple[Shapes, Shapes]:
    """(what an SDXL base checkpoint provides, the SUPIR-only tensors of the full official model).

    The SDXL side includes the CLIP position_ids buffer that checkpoints written by older transformers carry.
    """
    prefixes = tuple(manifests["supir_ckpt_expected"]["expected_prefixes"]["from_SUPIR_ckpt_required"])
    extra = manifests["sdxl_base_sgm"]["keys_probably_in_sdxl_ckpt_not_in_official_model"]["tensors"]
    sdxl = Shapes({**manifests["sdxl_base_sgm"]["tensors"], **extra})
    supir = Shapes({k: v for k, v in manifests["supir_model_full"]["tensors"].items() if k.startswith(prefixes)})
    assert supir.keys() == manifests["supir_ckpt_expected"]["supir_only_tensors"].keys()
    return sdxl, supir


def test_every_official_tensor_maps_one_to_one(manifests, params):
    sdxl, supir = sources(manifests)
    assert not sdxl.keys() & supir.keys()
    filled: dict[str, str] = {}
    for key, shape in {**sdxl, **supir}.items():
        if is_ignored(key):
            continue
        assert key in params, f"official tensor '{key}' has no MLX parameter"
        assert mlx_shape(tuple(shape), params[key]) == params[key], f"{key}: {shape} does not fit {params[key]}"
        filled[key] = key
    assert set(params) - set(filled) == set(), "MLX parameters without a source"
    ignored = [k for k in {**sdxl, **supir} if is_ignored(k)]
    assert ignored == ["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"]


def test_parameter_counts_match_the_official_model(manifests, params):
    numel = sum(int(mx.prod(mx.array(s)).item()) if s else 1 for s in params.values())
    assert numel == manifests["supir_model_full"]["num_params"] - 1000  # minus the denoiser.sigmas buffer


def test_loading_plan_accepts_sdxl_then_supir(manifests, params):
    """The loader's own shape-only plan: the two official files in order cover the model exactly."""
    sdxl, supir = sources(manifests)
    mapping = plan(params, Shapes({**sdxl, **supir}))
    assert len(mapping) == len(params)
    with pytest.raises(ValueError, match=rf"missing key '.*' \(and {len(supir) - 1} more\)"):
        plan(params, sdxl)
