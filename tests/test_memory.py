"""The memory planner: exact weight bytes, stage estimates, choosing settings that fit, refusing early."""

from __future__ import annotations

import mlx.core as mx
import pytest

from supir_mlx import memory
from supir_mlx.config import SUPIRConfig
from supir_mlx.memory import GB, MemoryPlanError
from supir_mlx.pipeline.tiled_vae import plan_tiles
from supir_mlx.weights.quantize import QuantSpec

FULL = SUPIRConfig.sdxl_v0()
# Exact parameter counts of the official model (reference manifests, meta-device build of SUPIR_v0.yaml).
UNET, CONTROL, PROJECT = 2_567_463_684, 1_243_378_880, 54_797_440
VAE = 2 * 34_163_592 + 49_490_179 + 92  # encoder, denoise_encoder, decoder, quant convs
TEXT = 123_060_480 + 694_659_841


def test_weight_bytes_are_exact_for_the_full_model():
    assert memory.weight_bytes(FULL, "denoiser", mx.float16, None) == 2 * (UNET + CONTROL + PROJECT)
    assert memory.weight_bytes(FULL, "vae", mx.float32, None) == 4 * VAE
    assert memory.weight_bytes(FULL, "text", mx.bfloat16, None) == 2 * TEXT


def test_quantized_weight_bytes():
    fp16 = memory.weight_bytes(FULL, "denoiser", mx.float16, None)
    q8 = memory.weight_bytes(FULL, "denoiser", mx.float16, QuantSpec(bits=8))
    q4 = memory.weight_bytes(FULL, "denoiser", mx.float16, QuantSpec(bits=4))
    q4_linear_only = memory.weight_bytes(FULL, "denoiser", mx.float16, QuantSpec(bits=4, convs=False))
    # packed bits plus a 16-bit scale and bias per 64 weights, over the ~all of the weights that quantize
    assert 0.50 < q8 / fp16 < 0.56 and 0.26 < q4 / fp16 < 0.32
    assert q4 < 0.8 * q4_linear_only  # the 3x3 convs are a large share of the UNet


def test_stages_and_printout():
    p = memory.estimate(1024, 1024, dtype="float16", quant=QuantSpec(bits=4), captioner="13b", budget=int(32 * GB))
    names = [s.name for s in p.stages]
    assert names == ["caption (LLaVA 13b)", "stage-1 (denoise enc + dec)", "text encoders", "encode", "diffusion", "decode"]
    # every stage runs inside the process (interpreter, libraries)
    assert p.process == memory.PROCESS_BYTES
    assert p.peak == p.process + max(s.total for s in p.stages) and p.fits
    text = str(p)
    assert "expected peak" in text and "<- peak" in text and "4-bit" in text
    assert f"process's {p.process / GB:.2f} GB" in text
    # the 13B captioner at 4 bits: ~13.35e9 params * (0.5 + 1/16) bytes, beside the VAE
    vae = memory.weight_bytes(FULL, "vae", mx.float32, None)
    assert 7.3 * GB < p.stages[0].weights - p.stages[1].weights < 7.9 * GB
    # the whole SUPIRModel stays loaded for every stage: VAE + text encoders + denoiser
    resident = vae + memory.weight_bytes(FULL, "text", mx.float16, None) + memory.weight_bytes(
        FULL, "denoiser", mx.float16, QuantSpec(bits=4))
    assert all(s.weights == resident for s in p.stages[1:])
    # the VAE stages are the tiled VAE's own estimates for the tiles it picked in what the weights, images and the
    # process leave; each stage also holds its output-sized images (the decode stage 3: input, stage-1, output)
    image = 1024 * 1024 * 3 * 4
    assert p.stages[5].activations == p.vae_tiles.decoder_bytes + 3 * image and "VAE tiles" in text
    assert p.stages[0].activations == memory.captioner_stage("13b", mx.float16)[1] + image
    assert p.vae_tiles == plan_tiles(FULL.vae, 1024, 1024, 32 * GB - p.process - p.stages[5].weights - 3 * image, 4)
    assert p.vae_budget == 32 * GB - p.process - p.stages[5].weights - 3 * image


def test_activation_formulas_grow_with_size_and_batch():
    a = memory.unet_activations(64, 64, 2, mx.float16)
    assert memory.unet_activations(128, 128, 2, mx.float16) > a > memory.unet_activations(64, 64, 1, mx.float16) > 0
    assert memory.unet_activations(64, 64, 2, mx.float32) > a


def test_planner_trades_quality_for_memory_only_when_needed():
    roomy = memory.plan(1024, 1024, captioner=None, memory_limit_gb=64)
    assert roomy.quant is None and roomy.unet_tile == 128 and roomy.cfg_batched
    q8 = memory.plan(1024, 1024, captioner=None, memory_limit_gb=roomy.peak / GB - 0.5)
    assert q8.fits and q8.peak < roomy.peak and (q8.quant is None or q8.quant.bits == 8)
    q4 = memory.plan(1024, 1024, captioner=None, memory_limit_gb=q8.peak / GB - 0.01)
    assert q4.fits and q4.peak < q8.peak
    fixed = memory.plan(1024, 1024, captioner=None, memory_limit_gb=64, quant=QuantSpec(bits=4), unet_tile=64)
    assert fixed.quant.bits == 4 and fixed.unet_tile == 64


def test_tiles_shrink_only_the_diffusion_stage():
    big = memory.estimate(2048, 2048, captioner=None, unet_tile=128, budget=GB)
    small = memory.estimate(2048, 2048, captioner=None, unet_tile=64, budget=GB)
    diff = {a.name: b.activations - a.activations for a, b in zip(big.stages, small.stages)}
    assert diff["diffusion"] < 0 and all(v == 0 for k, v in diff.items() if k != "diffusion")


def test_refuses_before_work_with_one_line():
    with pytest.raises(MemoryPlanError, match=r"needs at least .* but only 2.00 GB is available"):
        memory.plan(1024, 1024, captioner=None, memory_limit_gb=2)
    with pytest.raises(MemoryPlanError, match="captioning does not fit: try --captioner 7b or none"):
        memory.plan(1024, 1024, captioner="13b", memory_limit_gb=6)
    with pytest.raises(MemoryPlanError, match="multiple of 8"):
        memory.estimate(1000, 1001, budget=GB)
    with pytest.raises(MemoryPlanError, match="must be positive"):
        memory.available_memory(0)
    with pytest.raises(MemoryPlanError, match="unknown captioner"):
        memory.estimate(1024, 1024, captioner="70b", budget=GB)


def test_available_memory_uses_the_machine_with_headroom():
    got = memory.available_memory()
    assert 0 < got < 2**50
    assert memory.available_memory(12) == 12 * GB


def test_staged_plan_keeps_only_what_each_stage_needs():
    p = memory.estimate(1024, 1024, dtype="float16", captioner="7b", budget=int(32 * GB), staged=True)
    vae = memory.weight_bytes(FULL, "vae", mx.float32, None)
    text = memory.weight_bytes(FULL, "text", mx.float16, None)
    den = memory.weight_bytes(FULL, "denoiser", mx.float16, None)
    w = {s.name: s.weights for s in p.stages}
    assert w["stage-1 (denoise enc + dec)"] == w["encode"] == vae
    assert w["text encoders"] == vae + text and w["diffusion"] == vae + den and w["decode"] == vae
    assert w["caption (LLaVA 7b)"] == memory.captioner_stage("7b", mx.float16)[0]
    resident = memory.estimate(1024, 1024, dtype="float16", captioner="7b", budget=int(32 * GB))
    assert all(s.weights == vae + text + den for s in resident.stages[1:])
    assert "loaded per stage" in str(p) and "all resident" in str(resident)


@pytest.mark.parametrize("captioner", ["7b", None])
def test_each_stage_may_cache_only_the_room_it_leaves_below_the_peak(captioner):
    # fp16 with 9.5 GB: the diffusion stage is the peak, the untiled VAE stages leave GBs below it.
    p = memory.plan(1024, 1024, dtype="float16", captioner=captioner, memory_limit_gb=9.5)
    limits = p.cache_limits
    assert set(limits) == {"stage1", "condition", "sample", "decode"} | ({"caption"} if captioner else set())
    for s in p.stages:  # nothing cached takes a stage past the planned peak (past its floor, at the peak)
        assert p.process + s.total + limits[s.key] <= max(p.peak, p.process + s.total + p.cache_limit)
    peak = max(p.stages, key=lambda s: s.total)
    assert limits[peak.key] == p.cache_limit
    # the cache never takes the room an underestimate of the peak stage's activations would need
    assert p.peak + p.cache_limit + memory.FIT_MARGIN * peak.activations <= p.budget
    decode = next(s for s in p.stages if s.key == "decode")
    assert limits["decode"] == p.peak - p.process - decode.total > 2 * GB > 4 * p.cache_limit
    # stage 1 runs the posterior encode too: its room is the smaller of the two
    assert limits["stage1"] == p.peak - p.process - max(s.total for s in p.stages if s.key == "stage1")


def test_the_cache_keeps_clear_of_the_budget_by_the_fit_margin():
    roomy = memory.estimate(1024, 1024, dtype="float32", quant=QuantSpec(bits=8), captioner=None, staged=True,
                            budget=int(64 * GB))
    top = max(roomy.stages, key=lambda s: s.total)
    assert roomy.cache_limit == int(memory.CACHE_SHARE * roomy.peak)
    tight = memory.estimate(1024, 1024, dtype="float32", quant=QuantSpec(bits=8), captioner=None, staged=True,
                            budget=roomy.peak + int(0.1 * GB))
    assert tight.cache_limit == int(0.1 * GB) - int(memory.FIT_MARGIN * top.activations) > 0
    full = memory.estimate(1024, 1024, dtype="float32", quant=QuantSpec(bits=8), captioner=None, staged=True,
                           budget=roomy.peak)
    assert full.fits and full.cache_limit == 0


def test_planner_loads_per_stage_rather_than_spill_the_vae_to_disk():
    p = memory.plan(1024, 1024, dtype="float16", captioner=None, memory_limit_gb=8)
    resident = memory.estimate(1024, 1024, dtype="float16", captioner=None, quant=p.quant, unet_tile=p.unet_tile,
                               budget=p.budget)
    assert resident.fits and resident.vae_tiles.decoder_spill  # all resident fits only with small spilled tiles
    assert p.staged and p.quant == resident.quant and not (p.vae_tiles.encoder_spill or p.vae_tiles.decoder_spill)


def test_planner_stages_weights_before_quantizing_and_prefers_13b():
    roomy = memory.plan(1024, 1024, captioner="auto", memory_limit_gb=64)
    assert roomy.captioner == "13b" and not roomy.staged and roomy.quant is None
    # 12 GB: resident, the 13B captioner beside the fp16 SUPIR weights (~18 GB) cannot fit whatever the tiles
    p = memory.plan(1024, 1024, dtype="float16", captioner="13b", memory_limit_gb=12)
    assert p.staged and p.quant is None  # staging costs only re-reads; quantizing would cost quality


@pytest.mark.parametrize("ram_gb, target_gb", [(16, 8), (8, 5)])
def test_product_targets_are_planned(ram_gb, target_gb, monkeypatch):
    """A 1024 -> 2048 restore, captioner included, fits the budget the planner gives a 16 GB / 8 GB Mac,
    and that budget is the product's peak target."""
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx.metal, "device_info", lambda: {"max_recommended_working_set_size": ram_gb * GB * 2 / 3})
    budget = memory.available_memory()
    assert 0.95 * target_gb * GB <= budget <= target_gb * GB
    p = memory.plan(2048, 2048, dtype="float16", captioner="auto")
    assert p.fits and p.peak <= budget and p.captioner in ("13b", "7b")


def test_a_quantized_plan_on_the_cpu_backend_says_what_it_costs_in_time():
    quantized = str(memory.estimate(1024, 1024, dtype="float32", quant=QuantSpec(bits=8), captioner=None,
                                    budget=int(8 * GB)))
    plain = str(memory.estimate(1024, 1024, dtype="float32", quant=None, captioner=None, budget=int(8 * GB)))
    line = "8-bit weights on the CPU backend are expanded layer by layer before each product"
    assert (line in quantized) == (mx.default_device() == mx.cpu)
    assert "takes longer by a fixed amount, 15-22 s" in quantized or mx.default_device() != mx.cpu
    assert "unquantized time" not in plain


def test_the_plan_states_what_a_first_run_conversion_holds():
    from mlx.utils import tree_flatten

    from supir_mlx.models.supir import SUPIRModel
    from supir_mlx.weights.convert import SHARD_BYTES

    # the converter holds one shard plus the tensor it converts; the largest one in float32 must fit the margin
    largest = max(v.size for _, v in tree_flatten(SUPIRModel(SUPIRConfig.sdxl_v0()).parameters())) * 4
    assert memory.CONVERT_BYTES >= SHARD_BYTES + largest
    text = str(memory.estimate(1024, 1024, dtype="float32", quant=QuantSpec(bits=8), captioner=None, budget=int(8 * GB)))
    assert f"holding at most {memory.CONVERT_BYTES / GB:.2f} GB meanwhile" in text
