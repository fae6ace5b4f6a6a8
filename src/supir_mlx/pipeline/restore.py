"""The Python API: `Restorer` loads the weights once and restores any number of images.

    from supir_mlx import Restorer
    restorer = Restorer.from_pretrained()               # downloads + converts once, then loads from cache
    result = restorer.restore("photo.jpg", upscale=2)   # or a PIL image / uint8 array
    result.image.save("restored.png")

A restore follows the official test.py flow: pre-process (upscale, min size 1024, multiples of 64), caption
the stage-1 image (LLaVA, loaded only for that and freed before diffusion), sample, decode, colour fix,
and resize back to exactly input size x upscale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np
from PIL import Image

from ..config import SUPIRConfig
from ..events import EventCallback, StageClock
from ..models.supir import SUPIRModel
from ..sampling.noise import NoiseSource, SeededNoise
from ..sampling.tiled import Tiling, auto_tiling
from .preprocess import pil_to_tensor, processing_size, resize_bicubic_torch, tensor_to_image, tensor_to_uint8
from .residency import Residency
from .settings import RestoreSettings, settings_for
from .supir import StageStats, SupirRunner, Trace, VAETiles, bound_cache

def default_dtype() -> mx.Dtype:
    """fp16 diffusion on Metal; fp32 on the CPU backend (its fp16 matmul is slow)."""
    return mx.float16 if mx.metal.is_available() else mx.float32


def default_vae_dtype() -> mx.Dtype:
    """The official VAE runs in bf16 on GPUs (fp16 overflows in the decoder); fp32 on CPU."""
    return mx.bfloat16 if mx.metal.is_available() else mx.float32


def _settled(ensure: Callable[..., Path], *args, **kwargs) -> Path:
    """Run a weight-cache step (which may convert or quantize gigabytes) with freed buffers going back to the
    system, and give back what it freed before the weights load. Without this, a first run that converted kept
    8.2 GB resident after the conversion (glibc heap arenas) and peaked at 8.60 GB under an 8 GB limit."""
    from ..memory import bound_native_heap, release_freed

    bound_native_heap()
    try:
        return ensure(*args, **kwargs)
    finally:
        release_freed()


@dataclass
class RestoreResult:
    images: list[Image.Image]  # input size x upscale, 8-bit (official Tensor2PIL truncation); one per sample
    pixels: list[np.ndarray]  # the same results as float32 HxWx3 in [0, 1] (before 8-bit rounding), for 16-bit output
    stage1: Image.Image  # the cleaned stage-1 image at the output size
    caption: str
    settings: RestoreSettings
    stages: dict[str, StageStats] = field(default_factory=dict)
    source: Image.Image | None = None  # the input as restored (8-bit RGB)
    faces: dict[str, Any] | None = None  # face mode: the faces found, their captions (see pipeline.faces)
    plan: Any = None  # the memory plan the restore ran with (supir_mlx.memory.Plan)

    @property
    def image(self) -> Image.Image:
        return self.images[0]

    def fidelity(self, sample: int = 0):
        """The fidelity map of one sample against the input: where the output departs from what the input
        supports (`pipeline.fidelity`; `.score`, `.summary()`, `.render(pixels)`)."""
        from .fidelity import fidelity_map

        return fidelity_map(np.asarray(self.source), self.pixels[sample])

    @property
    def peak_memory(self) -> int:
        return max((s.peak_bytes for s in self.stages.values()), default=0)


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, (str, Path)):
        from ..io.images import load_image

        return load_image(image).to_pil()
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 image array, got shape {a.shape}")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"image arrays must be uint8 or float in [0, 1], got {a.dtype}")
        a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(a[:, :, :3])


class Restorer:
    face_models = None  # face mode's detector and parser (pipeline.faces.FaceModels), loaded at first use
    """A loaded SUPIR model plus (optionally) where its captioner lives; `restore` is callable repeatedly."""

    def __init__(
        self,
        model: SUPIRModel,
        *,
        captioner: str | Path | None = None,
        description: dict[str, Any] | None = None,
        memory_limit_gb: float | None = None,
        quant=None,
        weight_files: list[Path] | None = None,
        lazy: bool = False,
    ):
        """`weight_files`: the safetensors files `model` was loaded from; with them a staged memory plan can
        release the parts a stage does not need and read them back later (see pipeline.residency).
        `lazy`: `model`'s parameters are still unread lazy loads of `weight_files`; each part is read when a
        stage first needs it, so a staged plan never holds every weight at once, not even at load time."""
        self.model = model
        self.runner = SupirRunner(model, Residency(model, weight_files, loaded=not lazy) if weight_files else None)
        self.captioner_path = Path(captioner) if captioner else None
        self.description = description or {}
        self.memory_limit_gb = memory_limit_gb
        self.quant = quant

    @property
    def config(self) -> SUPIRConfig:
        return self.model.config

    # ------------------------------------------------------------------------------------- loading
    @classmethod
    def from_weights(
        cls,
        directory: str | Path,
        *,
        captioner: str | Path | None = None,
        dtype: mx.Dtype | str | None = None,
        vae_dtype: mx.Dtype | str | None = None,
        memory_limit_gb: float | None = None,
        quantize: int | None = None,
        log: Callable[[str], None] = print,
    ) -> "Restorer":
        """From a folder written by `supir-mlx convert` (any architecture: the folder describes it).

        `quantize` (8 or 4) quantizes the UNet and control encoder as downloaded weights are: once, into the
        weight cache (the folder itself is never changed), then every later run loads the quantized copy."""
        from ..weights import cache
        from ..weights.convert import load_converted, read_manifest
        from ..weights.quantize import QuantSpec

        directory = Path(directory).expanduser()
        dt = dtype or default_dtype()
        quant = QuantSpec(bits=quantize) if quantize else None
        if quant:
            entry = _settled(cache.ensure_quantized, directory, _dtype_name(dt), quant, log=log)
            model, weight_files = cache.load(entry, lazy=True), [entry / cache.QUANT_WEIGHTS]
        else:
            model = load_converted(directory, dt, lazy=True)
        manifest = read_manifest(directory)
        if not quant:
            weight_files = [directory / sh["file"] for sh in manifest["shards"]]
        _set_vae_dtype(model, vae_dtype)
        description = {"weights": str(directory), "sources": [s.get("name") for s in manifest.get("sources", [])]}
        return cls(model, captioner=captioner, description=description, memory_limit_gb=memory_limit_gb, quant=quant,
                   weight_files=weight_files, lazy=True)

    @classmethod
    def from_pretrained(
        cls,
        model: str = "v0Q",
        *,
        sdxl: str | None = None,
        supir: str | None = None,
        source: str = "pruned",
        captioner: str = "auto",
        dtype: mx.Dtype | str | None = None,
        vae_dtype: mx.Dtype | str | None = None,
        quantize: int | None = None,
        offline: bool = False,
        memory_limit_gb: float | None = None,
        log: Callable[[str], None] = print,
    ) -> "Restorer":
        """Fetch (once) the SDXL base, the SUPIR checkpoint and the captioner, convert them once into the
        weight cache, and load. `sdxl` / `supir` take a local path or `owner/repo/file` on the hub.
        `captioner` "auto" takes the 13B LLaVA when a 2048-pixel restore's memory plan allows it, else 7B."""
        from ..weights import cache, hub
        from ..weights.convert import load_converted, read_manifest
        from ..weights.quantize import QuantSpec

        dt = dtype or default_dtype()
        if captioner == "auto":
            from ..memory import MemoryPlanError, plan

            try:
                captioner = plan(2048, 2048, dtype=_dtype_name(dt), captioner="auto",
                                 memory_limit_gb=memory_limit_gb).captioner
            except MemoryPlanError:
                captioner = "7b"
        need = hub.required_files(model, source, captioner, sdxl, supir)
        files = hub.fetch(need, offline=offline)
        sources = files["sdxl"] + files["supir"]
        quant = QuantSpec(bits=quantize) if quantize else None
        entry = _settled(cache.ensure, sources, _dtype_name(dt), quant, log=log)
        net = cache.load(entry, lazy=True) if quant else load_converted(entry, dt, lazy=True)
        _set_vae_dtype(net, vae_dtype)
        weight_files = [entry / cache.QUANT_WEIGHTS] if quant else [entry / sh["file"] for sh in read_manifest(entry)["shards"]]
        captioner_dir = _prepare_captioner(captioner, files.get("captioner"), log) if captioner != "none" else None
        description = {"model": f"SUPIR-{model}", "base_checkpoint": Path(files["sdxl"][0]).name,
                       "supir_checkpoint": Path(files["supir"][0]).name, "weights": str(entry)}
        return cls(net, captioner=captioner_dir, description=description, memory_limit_gb=memory_limit_gb, quant=quant,
                   weight_files=weight_files, lazy=True)

    # ------------------------------------------------------------------------------------- restore
    def plan(self, width: int, height: int, settings: RestoreSettings | None = None, captioner: bool | None = None):
        """The memory plan for an input of width x height (see supir_mlx.memory)."""
        from ..memory import plan

        s = settings or RestoreSettings()
        W, H, _, _ = processing_size(width, height, s.upscale, s.min_size)
        use_captioner = self._will_caption(s) if captioner is None else captioner
        p = plan(
            W, H, config=self.config, dtype=_dtype_name(self.runner.net_dtype),
            captioner=captioner_size(self.captioner_path) if use_captioner else None,
            memory_limit_gb=self.memory_limit_gb, quant=self.quant, unet_tile=s.tile_size,
        )
        if p.staged and self.runner.residency is None:
            from ..memory import MemoryPlanError

            raise MemoryPlanError("this restore fits only with weights loaded per stage, which needs the Restorer to be "
                                  "loaded from weight files (Restorer.from_weights / from_pretrained)")
        return p

    def _will_caption(self, s: RestoreSettings) -> bool:
        return s.prompt is None and self.captioner_path is not None

    def caption(self, image: Any, settings: RestoreSettings | None = None, staged: bool = False) -> str:
        """The official captioning request on the stage-1 image (made at settings.caption_size, 512 as test.py).
        `staged`: LLaVA gets the memory alone (every SUPIR part is released while it runs)."""
        from ..captioner import Captioner

        s = settings or RestoreSettings()
        if self.captioner_path is None:
            raise RuntimeError("this Restorer has no captioner (pass captioner=... or give a prompt)")
        img = _as_pil(image)
        x, h1, w1 = pil_to_tensor(img, s.upscale, s.min_size, fix_resize=s.caption_size)
        self.runner.use(staged, "vae")
        clean = np.array(self.runner.denoise_stage1(mx.array(x)))
        stage1 = Image.fromarray(tensor_to_image(clean[0], h1, w1))
        self.runner.use(staged)
        with Captioner.load(self.captioner_path) as captioner:
            text = captioner.caption(stage1, seed=s.seed)
        from ..memory import release_freed

        release_freed()
        return text

    def restore(
        self,
        image: Any,
        settings: RestoreSettings | None = None,
        *,
        preset: str = "default",
        noise: NoiseSource | None = None,
        on_event: EventCallback | None = None,
        face_landmarks: Any = None,
        group=None,
        **overrides: Any,
    ) -> RestoreResult:
        """Restore one image (a path, PIL image or HxWx3 array).

        Settings: `settings`, or `preset` ("default", "quality", "fidelity", "lightning", ...) with any
        knob of RestoreSettings given as a keyword overriding it. `noise` replaces the seeded draws
        (e.g. to replay another implementation's); by default every draw comes from settings.seed.
        `on_event` receives stage events (caption, stage1, condition, sample, decode) and one step event per
        sampler step, whose `latent` / `denoised` hold the current latent and x0 estimate (supir_mlx.events).
        `faces=True` runs face mode (pipeline.faces); `face_landmarks` ([n, 5, 2] input pixels) skips detection.
        `group` (mx.distributed.init() under mlx.launch) divides each sampling step's tiles among the processes,
        which all call restore with the same arguments and all get the single-process result (face mode's own
        passes over the faces run whole on every rank).
        """
        s = (settings.updated(**overrides) if settings else settings_for(preset, **overrides)).validate()
        img = _as_pil(image)
        faces = None
        if s.faces:
            from .faces import restore_faces

            if noise is not None:
                raise ValueError("face mode draws every pass's noise from the seed, as officially; it cannot replay given draws")
            done, faces = restore_faces(self, img, s, landmarks=face_landmarks, on_event=on_event)
            if done is not None:
                return done
        x, h0, w0 = pil_to_tensor(img, s.upscale, s.min_size)
        H, W = x.shape[1:3]
        plan = self.plan(img.width, img.height, s)  # raises MemoryPlanError before any work if nothing fits
        from ..memory import bound_native_heap

        bound_native_heap()
        cache_limits = plan.cache_limits
        bound_cache(cache_limits.get("caption", plan.cache_limit))  # the pipeline's stages set their own
        caption = s.prompt if s.prompt is not None else ""
        if s.prompt is None and self._will_caption(s):
            report = StageClock(on_event)
            report("caption", 0, 1)
            caption = self.caption(img, s, plan.staged)
            report("caption", 1, 1)
        vae_tiles = self._vae_tiles(s, plan)
        f = self.config.vae.downsample_factor
        tiling = Tiling(s.tile_size, s.tile_stride or s.tile_size // 2) if s.tile_size else auto_tiling(H // f, W // f, plan.unet_tile)
        trace = Trace(keep=("x_stage1",))
        x = mx.array(x)  # (the NumPy copy would stay alive beside the pipeline's through every stage)
        out = self.runner.sample(
            x, [caption], s, noise or SeededNoise(s.seed), tiling=tiling, vae_tiles=vae_tiles,
            batched_cfg=plan.cfg_batched, staged=plan.staged, on_event=on_event, trace=trace, group=group,
            cache_limits=cache_limits,
        )
        out = np.array(out)
        pixels = [np.clip((resize_bicubic_torch(o, h0, w0) + 1) / 2, 0, 1) for o in out]
        images = [Image.fromarray(tensor_to_uint8(p * 2 - 1)) for p in pixels]
        stage1 = Image.fromarray(tensor_to_image(np.array(trace.tensors["x_stage1"][0]), h0, w0))
        return RestoreResult(images, pixels, stage1, caption, s, trace.stages, img, faces, plan)

    def _vae_tiles(self, s: RestoreSettings, plan) -> VAETiles:
        """The plan's VAE tiles (None where a pass runs untiled), spilling tile states to disk past the
        memory the plan leaves the VAE passes (Plan.vae_budget)."""
        budget = plan.vae_budget
        if s.vae_encoder_tile or s.vae_decoder_tile:
            return VAETiles(s.vae_encoder_tile, s.vae_decoder_tile, budget)
        t = plan.vae_tiles
        side = max(plan.width, plan.height)
        return VAETiles(t.encoder_tile if t.encoder_tile < side else None,
                        t.decoder_tile if t.decoder_tile < -(-side // self.config.vae.downsample_factor) else None, budget)


def draft_box(width: int, height: int, settings: RestoreSettings, side: int = 1024) -> tuple[int, int, int, int]:
    """The centred crop (left, top, right, bottom) of an input whose working image is at most side x side.

    A draft restores just this crop with the run's own settings: the look of the full result at the cost of
    about one sampler tile, before committing to the whole image.
    """
    scale = max(settings.upscale, settings.min_size / min(width, height))
    cw, ch = min(width, max(1, round(side / scale))), min(height, max(1, round(side / scale)))
    left, top = (width - cw) // 2, (height - ch) // 2
    return left, top, left + cw, top + ch


def captioner_size(path: Path) -> str:
    """"13b" or "7b" from a converted captioner's config (the memory plan counts its weights); a folder that
    cannot be used raises ValueError naming it and what is wrong."""
    from ..weights.llava_convert import check_llava_folder

    return "13b" if check_llava_folder(path).text.hidden_size > 4096 else "7b"


def _dtype_name(dtype: mx.Dtype | str) -> str:
    from ..weights.loading import dtype_name, parse_dtype

    return dtype_name(parse_dtype(dtype))


def _set_vae_dtype(model: SUPIRModel, vae_dtype: mx.Dtype | str | None) -> None:
    from ..weights.loading import parse_dtype

    dt = parse_dtype(vae_dtype) if vae_dtype is not None else default_vae_dtype()
    if dt == mx.float16:
        raise ValueError("the VAE cannot run in float16 (it overflows); use float32 or bfloat16")
    model.first_stage_model.set_dtype(dt)  # lazy: read (and cast) when a stage first uses the VAE


def _prepare_captioner(size: str, files: list[Path] | None, log: Callable[[str], None]) -> Path:
    """The converted (4-bit) captioner folder, converting the downloaded llava-hf files once."""
    from ..weights.llava_convert import convert_llava, default_llava_dir

    target = default_llava_dir(size)
    if (target / "config.json").is_file():
        return target
    if not files:
        raise FileNotFoundError(f"no captioner weights for LLaVA {size}")
    log(f"converting the LLaVA-1.5 {size} captioner to 4-bit MLX once into {target}")
    return convert_llava(Path(files[0]).parent, target)
