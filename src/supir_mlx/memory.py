"""Memory planner: the peak a restore will reach, computed before any work, and the settings that fit.

Peak = what the process holds throughout (PROCESS_BYTES: interpreter, libraries) + the max over stages of (weights
resident in that stage + that stage's activation peak, the images it holds included).
- Weights are counted exactly: each network is built lazily (MLX allocates nothing until evaluation)
  in the run's dtype, quantized by the same `QuantSpec` the weights cache uses, and its arrays'
  `nbytes` summed; LLaVA-1.5 likewise, as its converted folder loads (4-bit language model, the rest in the run's
  dtype), with its KV cache counted by mlx-lm's allocation rule.
- The tiled VAE's stages come from `pipeline.tiled_vae.plan_tiles`, which also picks the VAE tiles for
  the memory left by the weights (its constants and the passes they were fitted to: tiled_vae.COPIES).
- The other activations follow formulas fitted to peaks measured with `bench/bench_restore_memory.py --calibrate`
  (full-size random-weight networks, MLX CPU backend, fp32 activations; fp16/bf16 activations are
  taken as half of those, an assumption not measured). See each formula's comment.

Budget: `--memory-limit` if given, else half the RAM but at least 5 GB, never more than HEADROOM x the
recommended working set (Metal's, about 2/3 of RAM; 2/3 of RAM elsewhere). That is the product's promise:
8 GB on a 16 GB Mac, 5 GB on an 8 GB one, leaving the rest to macOS and the user's other applications.

Residency: with everything resident the weights of all three SUPIR parts stay in memory for every stage
(fastest: nothing is read twice). A staged plan keeps only what a stage needs (caption: LLaVA alone, after
its stage-1 image is made; text encoders: VAE + text; diffusion: VAE + UNet/control; stage 1, encode and
decode: VAE) and reads the rest back from the weight files when needed, at the cost of re-reading a few GB
per image. LLaVA itself always drops its vision tower before generating (see `captioner_stage`).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from dataclasses import dataclass, field, replace

import mlx.core as mx

from .config import SUPIRConfig
from .pipeline.tiled_vae import TilePlan, plan_tiles
from .weights.quantize import QuantSpec

GB = 1e9
HEADROOM = 0.94  # of the working set: allocator fragmentation and the image buffers need the rest
WORKING_SET_OF_RAM = 2 / 3  # Metal's recommended working set is about 2/3 of RAM; mirrored elsewhere
MIN_BUDGET = 5 * GB
DEFAULT_TILE = 128  # official sampler tile, latent pixels
MIN_TILE = 32
# MLX keeps freed buffers for reuse. Unbounded, that cache held the difference between a run's planned 6.98 GB
# and its measured 9.74 GB process peak. At the peak stage a restore lets it use the room its plan leaves below
# the budget, but at most this share of the planned peak; a lighter stage may also fill the room it leaves
# below the peak (Plan.cache_limits), so what the process holds stays within the plan.
CACHE_SHARE = 0.05
# Of the room below the budget, the cache never gets this share of the peak stage's activations: the activation
# formulas are fitted within 4.4% of their measurements, and a cache filled to the budget would turn any
# underestimate into a process above the limit (run I in bench/README.md filled 0.64 GB of room, 40 MB short of it).
FIT_MARGIN = 0.05

# UNet + control encoder, one call on a [B, h, w] latent tile, fp32 activations:
#   bytes = B * (UNET_PER_PIXEL * h*w + UNET_PER_SCORE * min(10 * (h*w/4)^2, 2^26) + UNET_PER_ITEM) * s/4
# The first term is the feature maps; the second the attention scores of the 640-channel level (10 heads over
# h*w/4 tokens), which layers.attention computes in chunks of at most 2^26 scores per batch item, one chunk alive
# at a time; the third a part per batch item that does not grow with the tile (measured, not attributed).
# Relative least squares over MLX allocator peaks (`bench_restore_memory.py --calibrate unet`, full-size networks
# at reduced depth: blocks run one after another, so depth does not change the peak), 16 to 128 latent px at
# batch 1 and 2 (Dec 2026, CPU backend, the host attention, GELU and norms working in place): within 4.4% of all
# ten peaks (128x128: 0.611 GB at batch 1, 1.221 GB at batch 2; 64x64: 0.154 / 0.327 GB). On Metal the fused
# attention never stores the scores, so there the formula errs on the safe side.
UNET_PER_PIXEL = 14_544.0
UNET_PER_SCORE = 5.05
UNET_PER_ITEM = 45_380_000
# What the process holds besides what its stages count, through every stage: the interpreter, MLX, NumPy, Pillow
# and our modules (MKL too, where preloaded) with the models' Python objects: 0.12-0.13 GB resident in
# bench_restore_process.py's runs just before the first weights load (x86-64 Linux).
PROCESS_BYTES = 150_000_000
# Output-sized float32 RGB images each stage holds beside its own work: the upscaled input while LLaVA captions;
# it and the stage-1 image (the colour fix's reference) from stage 1 on; in the decode stage also the
# colour-fixed output (the decoder's own output is counted in its pass, tiled_vae.estimate_bytes).
IMAGES = {"caption": 1, "stage1": 2, "condition": 2, "sample": 2, "decode": 3}
# Dequantized weights alive at once during a quantized call. Each layer's dequantization waits for its input
# (weights.quantize, mx.depends), so about one is alive at a time. bench_denoiser_step.py --latent 16, batch 2,
# fp32: 0.37 GB above the weights with 4-bit weights (3x3 convs included) against 0.24 GB unquantized. (Before
# that wait: 485 MB, MLX dequantizing many layers ahead of their use.)
QUANT_CONV_TRANSIENT = 130_000_000
# Text encoders over 77 tokens, batch 2: a few MB of activations; 0.1 GB covers the attention
# temporaries (estimate, not measured: the encoders run in well under 1% of the weights' bytes).
TEXT_ACTIVATIONS = int(0.1 * GB)
# LLaVA-1.5 caption stage (captioner.Captioner.generate_ids): the quantized language model stays resident; on
# top of it first the vision tower + projector (kept in the run's dtype) and their activations, then, with the
# tower released, the KV cache for the prompt and 512 new tokens (mlx-lm's KVCache grows in steps of 256
# positions) and the prefill's temporaries: one layer's attention scores and MLP activations over the 630-token
# prompt. The activation constants are peaks measured by bench/bench_captioner.py with full-width random 4-bit
# models: vision 87 MB fp32 / 56 MB fp16; prefill temporaries (Dec 2026, MLX's quantized kernels as a restore runs
# them, fp32) 7B 0.259 / 0.269 / 0.269 GB at 2 / 3 / 6 layers, 13B 0.323 GB at 2 layers (a 1-layer model
# understates them: only the K/V projections that fill its cache are evaluated), each taken with a few % to
# spare. (The Nov constants, 0.53 / 0.79 GB, were fitted to a measurement that multiplied by dequantized weights
# on the CPU to save time.) fp16 activations take half the bytes on Metal; the fp32 figures are used for every
# dtype.
CAPTIONERS = ("13b", "7b")
CAPTIONER_BITS = 4  # the captioner is converted to 4-bit MLX once
CAPTIONER_GROUP = 64
CAPTION_PROMPT_TOKENS = 630  # SUPIR's request: 36 tokens, 576 image features, 18 tokens (LLaMA tokenizer)
CAPTION_NEW_TOKENS = 512  # captioner.MAX_NEW_TOKENS
KV_STEP = 256
CAPTION_VISION_ACTIVATIONS = {"7b": 87_000_000, "13b": 96_000_000}
CAPTION_PREFILL_TEMPORARIES = {"7b": 280_000_000, "13b": 345_000_000}


# A denoiser call with quantized weights on the CPU backend, where each quantized layer dequantizes its weights
# for a BLAS product, against float32 weights (bench_denoiser_step.py, full size, 2-core x86-64): 8-bit at a
# 64x64 latent 55.6 s against 40.8 s (+15 s, 1.36x); 4-bit at 16x16 31.9 s against 10.2 s (+22 s). The cost is
# per call, not per pixel. GPU backends multiply quantized weights directly.
CPU_QUANT_SLOWDOWN = 1.36
CPU_QUANT_SECONDS = (15, 22)

# A first run's one-time conversion of the checkpoints into the weight cache (weights.cache): the converter holds
# one shard (weights.convert.SHARD_BYTES) plus the tensor being converted (the largest, OpenCLIP bigG's token
# embedding, is 253 MB in float32); quantizing then writes one module at a time. Measured with the full-size
# random checkpoints (bench_restore_process.py's, float32, 8-bit): the whole step peaked at 2.29 GB resident.
CONVERT_BYTES = 2 * 1024**3 + 256 * 1024**2


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD = 1 << 20


@functools.cache
def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def bound_native_heap() -> None:
    """Make freed MLX buffers go back to the system (Linux, glibc; elsewhere nothing to do).

    MLX's CPU backend takes its buffers from malloc. glibc raises its mmap threshold each time a large block is
    freed (up to 32 MB), after which blocks below it come from heap arenas that keep freed memory: a 1024-px
    restore's resident memory grew 2 GB past anything MLX held at once. A fixed 1 MB threshold keeps every
    large buffer in its own mapping, unmapped when freed."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def release_freed() -> None:
    """Return what is free to the system: unreachable Python objects' arrays, MLX's buffer cache, and (glibc)
    free heap pages."""
    import gc

    gc.collect()
    mx.clear_cache()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class MemoryPlanError(RuntimeError):
    """No setting makes the run fit; the message says how much it needs and what is available."""


@dataclass(frozen=True)
class Stage:
    name: str
    weights: int  # bytes of the models resident during the stage
    activations: int
    key: str = ""  # the pipeline stage it runs in: caption, stage1, condition, sample, decode

    @property
    def total(self) -> int:
        return self.weights + self.activations


@dataclass(frozen=True)
class Plan:
    width: int
    height: int
    stages: tuple[Stage, ...]
    budget: int
    dtype: str
    quant: QuantSpec | None
    unet_tile: int
    cfg_batched: bool
    captioner: str | None
    vae_tiles: TilePlan  # the tiled VAE's own plan (tiles, spilling) for the memory the weights leave
    staged: bool = False  # True: each stage loads only the weights it needs (see Residency above)
    notes: tuple[str, ...] = field(default=())

    @property
    def process(self) -> int:
        """Bytes held through every stage besides its weights and activations."""
        return PROCESS_BYTES

    @property
    def peak_stage(self) -> Stage:
        return max(self.stages, key=lambda s: s.total)

    @property
    def peak(self) -> int:
        return self.process + self.peak_stage.total

    @property
    def vae_budget(self) -> int:
        """Bytes the VAE passes were planned in (tiled_vae.plan_tiles; a pass spills past it)."""
        w_vae = max(st.weights for st in self.stages if st.name in ("encode", "decode"))
        return vae_budget(self.budget, w_vae, self.width, self.height)

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    @property
    def cache_limit(self) -> int:
        """Bytes of freed buffers MLX may keep for reuse at the peak stage (mx.set_cache_limit)."""
        margin = int(FIT_MARGIN * self.peak_stage.activations)
        return max(0, min(self.budget - self.peak - margin, int(CACHE_SHARE * self.peak)))

    @property
    def cache_limits(self) -> dict[str, int]:
        """Bytes of freed buffers MLX may keep in each pipeline stage (Stage.key): the room the stage's estimates
        leave below the planned peak, and at least `cache_limit`, so the process stays within the plan.

        A buffer taken from the cache skips the kernel's page mapping and zero fill. On the CPU backend a 512-px
        VAE decode after a warm-up ran 12-22% faster with its whole working set cached (a cache holding only part
        of it, 1 GB, gained nothing measurable), and a 1024-px restore's stage 1 (three VAE passes, each reusing
        what the one before freed) 15% faster with 10 GB of room (bench/README.md, run G)."""
        room: dict[str, int] = {}
        top = self.peak_stage.total
        for s in self.stages:
            room[s.key] = min(room.get(s.key, top), top - s.total)
        return {key: max(r, self.cache_limit) for key, r in room.items()}

    def __str__(self) -> str:
        q = f"{self.quant.bits}-bit{' (+3x3 convs)' if self.quant.convs else ''}" if self.quant else "none"
        lines = [
            f"Memory plan for a {self.width}x{self.height} output ({self.dtype}, quantization {q}, "
            f"sampler tile {self.unet_tile} latent px, CFG {'batch 2' if self.cfg_batched else 'sequential'}, "
            f"captioner {self.captioner or 'none'}, weights {'loaded per stage' if self.staged else 'all resident'})",
            f"  {'stage':30s} {'weights':>9s} {'activ.':>9s} {'total':>9s}   (each with the process's "
            f"{_gb(self.process)}: interpreter, libraries)",
        ]
        for s in self.stages:
            total = self.process + s.total
            mark = "  <- peak" if total == self.peak else ""
            lines.append(f"  {s.name:30s} {_gb(s.weights):>9s} {_gb(s.activations):>9s} {_gb(total):>9s}{mark}")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"  expected peak {_gb(self.peak)} of {_gb(self.budget)} available: {verdict}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def vae_budget(budget: int, vae_weights: int, width: int, height: int) -> int:
    """Bytes a VAE pass may use (tiles and spilling are chosen for it): what the process, the weights resident
    around the pass and the stage's images leave of the budget."""
    return max(budget - PROCESS_BYTES - vae_weights - max(IMAGES.values()) * height * width * 3 * 4, 1)


def _gb(n: int) -> str:
    return f"{n / GB:.2f} GB"


def available_memory(limit_gb: float | None = None) -> int:
    """Bytes this run may use: the given limit, or HEADROOM x (Metal working set, else 2/3 of physical RAM)."""
    if limit_gb is not None:
        if limit_gb <= 0:
            raise MemoryPlanError(f"memory limit must be positive, got {limit_gb} GB")
        return int(limit_gb * GB)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if mx.metal.is_available():
        working_set = mx.metal.device_info()["max_recommended_working_set_size"]
        ram = working_set / WORKING_SET_OF_RAM
    else:
        working_set = ram * WORKING_SET_OF_RAM
    return int(min(HEADROOM * working_set, max(ram / 2, MIN_BUDGET)))


def _dtype(dtype: mx.Dtype | str) -> mx.Dtype:
    if isinstance(dtype, mx.Dtype):
        return dtype
    try:
        return {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[dtype]
    except KeyError:
        raise MemoryPlanError(f"unknown dtype '{dtype}' (float32, float16 or bfloat16)") from None


@functools.lru_cache(maxsize=64)
def weight_bytes(config: SUPIRConfig, component: str, dtype: mx.Dtype, quant: QuantSpec | None) -> int:
    """Exact stored bytes of one component ('denoiser', 'vae', 'text'), counted on a lazily built module."""
    import mlx.nn as nn

    from .weights.quantize import parameter_bytes, quantize

    root = nn.Module()  # SUPIRModel's attribute paths, so QuantSpec scopes apply unchanged
    if component == "denoiser":
        from .models.unet import GLVControl, LightGLVUNet

        root.model = nn.Module()
        root.model.diffusion_model = LightGLVUNet(config.unet, config.project)
        root.model.control_model = GLVControl(config.unet)
    elif component == "vae":
        from .models.vae import AutoencoderKL

        root.first_stage_model = AutoencoderKL(config.vae)
    elif component == "text":
        from .models.conditioner import Conditioner

        root.conditioner = Conditioner(config)
    else:
        raise ValueError(f"unknown component '{component}'")
    root.set_dtype(dtype)
    if quant is not None and any(path.startswith(quant.scope) for path, _ in root.named_modules()):
        quantize(root, quant)
    return parameter_bytes(root)


def llava_bytes(cfg, dtype: mx.Dtype, bits: int = CAPTIONER_BITS, group_size: int = CAPTIONER_GROUP) -> tuple[int, int]:
    """(language model, vision tower + projector) bytes of a LlavaConfig as `load_llava` holds a converted folder:
    the language model quantized, the rest in `dtype`. Counted on a lazily built model (nothing is allocated)."""
    import mlx.nn as nn

    from .models.llava import LlavaModel
    from .weights.quantize import parameter_bytes

    model = LlavaModel(cfg)
    model.set_dtype(dtype)
    nn.quantize(model.language_model, group_size, bits)
    return (parameter_bytes(model.language_model),
            parameter_bytes(model.vision_tower) + parameter_bytes(model.multi_modal_projector))


def kv_cache_bytes(text, positions: int, dtype: mx.Dtype) -> int:
    """Bytes of mlx-lm's KV cache for a Llama `ModelArgs` after `positions` tokens (buffers grow by KV_STEP)."""
    slots = -(-positions // KV_STEP) * KV_STEP
    head_dim = text.head_dim or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * slots * text.num_key_value_heads * head_dim * dtype.size


@functools.lru_cache(maxsize=8)
def captioner_stage(name: str, dtype: mx.Dtype) -> tuple[int, int]:
    """(bytes of LLaVA-1.5 `name`'s quantized language model, bytes on top of it at the caption stage's peak)."""
    from .models.llava import LlavaConfig

    cfg = LlavaConfig.llava_v15(name)
    lm, vision = llava_bytes(cfg, dtype)
    kv = kv_cache_bytes(cfg.text, CAPTION_PROMPT_TOKENS + CAPTION_NEW_TOKENS, dtype)
    return lm, max(vision + CAPTION_VISION_ACTIVATIONS[name], kv + CAPTION_PREFILL_TEMPORARIES[name])


def unet_activations(h: int, w: int, batch: int, dtype: mx.Dtype) -> int:
    heads1 = 10  # 640 channels / 64 per head at the first attention level
    scores = min(heads1 * (h * w / 4) ** 2, 2**26)
    s = dtype.size / 4
    return int(batch * (UNET_PER_PIXEL * h * w + UNET_PER_SCORE * scores + UNET_PER_ITEM) * s)


def estimate(
    width: int,
    height: int,
    *,
    config: SUPIRConfig | None = None,
    dtype: mx.Dtype | str = "float16",
    quant: QuantSpec | None = None,
    unet_tile: int = DEFAULT_TILE,
    cfg_batched: bool = True,
    captioner: str | None = "13b",
    budget: int | None = None,
    staged: bool = False,
) -> Plan:
    """The plan for one output of width x height pixels (multiples of 8) with exactly these settings."""
    if width < 64 or height < 64 or width % 8 or height % 8:
        raise MemoryPlanError(f"output size must be at least 64x64 and a multiple of 8, got {width}x{height}")
    if captioner is not None and captioner not in CAPTIONERS:
        raise MemoryPlanError(f"unknown captioner '{captioner}' (13b, 7b or none)")
    config = config or SUPIRConfig.sdxl_v0()
    dt = _dtype(dtype)
    vdt = mx.float32 if dt == mx.float16 else dt  # the SDXL VAE overflows in fp16 (weights.loading.component_dtypes)
    vae = weight_bytes(config, "vae", vdt, None)
    text = weight_bytes(config, "text", dt, quant)  # quantized only if the spec's scope names the conditioner
    den = weight_bytes(config, "denoiser", dt, quant)
    lh, lw = height // 8, width // 8
    th, tw = min(unet_tile, lh), min(unet_tile, lw)
    latents = 8 * lh * lw * 4 * 4  # x, noise, control, blend sums: a handful of fp32 4-channel latents
    budget = budget if budget is not None else available_memory()
    image = height * width * 3 * 4
    # Resident: the whole SUPIRModel stays loaded. Staged: the VAE stays (but for captioning), the text
    # encoders and the UNet/control are loaded for their stages only (pipeline.restore.Residency).
    every = vae + text + den
    w_vae, w_text, w_den = (vae, vae + text, vae + den) if staged else (every, every, every)
    # The tiled VAE plans its own tiles (and spilling) in what the weights around it leave free.
    tiles = plan_tiles(config.vae, height, width, vae_budget(budget, w_vae, width, height), vdt.size)
    stages = []
    if captioner:
        cap_w, cap_a = captioner_stage(captioner, dt)
        # staged: the caption's stage-1 image is made first, then even the VAE makes room for LLaVA
        stages.append(Stage(f"caption (LLaVA {captioner})", cap_w + (0 if staged else every), cap_a, "caption"))
    stages += [
        Stage("stage-1 (denoise enc + dec)", w_vae, max(tiles.encoder_bytes, tiles.decoder_bytes), "stage1"),
        Stage("text encoders", w_text, TEXT_ACTIVATIONS, "condition"),
        Stage("encode", w_vae, tiles.encoder_bytes, "stage1"),  # the posterior encode ends the pipeline's stage 1
        Stage("diffusion", w_den, unet_activations(th, tw, 2 if cfg_batched else 1, dt) + latents
              + (int(QUANT_CONV_TRANSIENT * dt.size / 4) if quant and quant.convs else 0), "sample"),
        Stage("decode", w_vae, tiles.decoder_bytes, "decode"),
    ]
    stages = [replace(st, activations=st.activations + IMAGES[st.key] * image) for st in stages]
    spill = " (tile states spilled to disk)" if tiles.encoder_spill or tiles.decoder_spill else ""
    notes = (f"VAE tiles: encoder {tiles.encoder_tile} px, decoder {tiles.decoder_tile} latent px{spill}",
             f"a first run converts the checkpoints into the weight cache once, before the stages, holding at most "
             f"{_gb(CONVERT_BYTES)} meanwhile")
    if quant and mx.default_device() == mx.cpu:
        notes += (f"{quant.bits}-bit weights on the CPU backend are expanded layer by layer before each product: "
                  f"every denoiser call (one per tile and step) takes longer by a fixed amount, "
                  f"{CPU_QUANT_SECONDS[0]}-{CPU_QUANT_SECONDS[1]} s on a 2-core x86-64 machine "
                  f"(about {CPU_QUANT_SLOWDOWN:.1f}x the unquantized time at a 64-latent tile)",)
    return Plan(width, height, tuple(stages), budget, str(dt).split(".")[-1], quant, unet_tile, cfg_batched, captioner,
                tiles, staged, notes)


def _spills(p: Plan) -> bool:
    return p.vae_tiles.encoder_spill or p.vae_tiles.decoder_spill


def plan(
    width: int,
    height: int,
    *,
    config: SUPIRConfig | None = None,
    dtype: mx.Dtype | str = "float16",
    captioner: str | None = "13b",
    memory_limit_gb: float | None = None,
    quant: QuantSpec | None | str = "auto",
    unet_tile: int | None = None,
) -> Plan:
    """The highest-quality settings that fit; raises MemoryPlanError before any work if none does.

    Preference: the 13B captioner, then 7B (`captioner="auto"`); unquantized, then 8-bit, then 4-bit
    weights; the official 128-latent tile, then smaller ones; all weights resident, then loaded per stage
    (same numbers, only re-reads), but loaded per stage where all resident would spill VAE tile states to disk;
    batched CFG, then sequential CFG (same numbers, half the activations).
    A fixed `captioner`, `quant` or `unet_tile` is respected as given.
    """
    budget = available_memory(memory_limit_gb)
    quants = [None, QuantSpec(bits=8), QuantSpec(bits=4)] if quant == "auto" else [quant]
    tiles = [unet_tile] if unet_tile else [DEFAULT_TILE, 96, 64, 48, MIN_TILE]
    captioners = ["13b", "7b"] if captioner == "auto" else [captioner]
    best = None
    for cap in captioners:
        for q in quants:
            for tile in tiles:
                spilling = None
                for staged in (False, True):
                    for batched in (True, False):
                        p = estimate(width, height, config=config, dtype=dtype, quant=q, unet_tile=tile,
                                     cfg_batched=batched, captioner=cap, budget=budget, staged=staged)
                        if p.fits:
                            # Re-reading the weights stage by stage costs seconds; VAE tile states written to and
                            # read back from disk, with the small tiles that forced them, cost far more.
                            if not _spills(p):
                                return p
                            spilling = spilling or p
                            break
                        best = p if best is None or p.peak < best.peak else best
                if spilling:
                    return spilling
    captioner = best.captioner
    worst = best.peak_stage
    smaller = "7b or none" if captioner == "13b" else "none"
    hint = (f" (captioning does not fit: try --captioner {smaller})"
            if captioner and best.process + best.stages[0].total > budget else "")
    raise MemoryPlanError(
        f"a {width}x{height} restore needs at least {_gb(best.peak)} (stage '{worst.name}') but only "
        f"{_gb(budget)} is available{hint}; use a smaller --upscale or raise --memory-limit"
    )
