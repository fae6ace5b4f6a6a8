"""The choices a run makes before loading anything, in one place for the CLI, the Studio and API users.

    options = LoadOptions(weights="converted/", memory_limit_gb=8)
    run = plan_run(["a.jpg", "b.png"], settings, options)    # nothing loaded, nothing decoded
    print(run)                                                # what `restore --plan` prints
    restorer = load_restorer(run)                             # loads exactly what the plans assumed

`plan_run` plans every input from its header, then fixes what the weights are loaded with once for the whole
batch: the strongest quantization any input needs and the smaller captioner if any input needs it. Every
input is then planned again with those fixed choices, so each printed plan is the plan `Restorer.restore`
computes for that input when it runs (`RestoreResult.plan`). Converted folders (`--weights DIR`) and downloaded
weights get the same choices: a folder that does not fit unquantized is quantized while loading (once, into
the weight cache), exactly like downloaded weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..memory import MemoryPlanError, Plan, plan
from ..weights.quantize import QuantSpec
from .settings import RestoreSettings, check_number

CAPTIONER_CHOICES = ("auto", "13b", "7b", "none")
WATCH_SIZE = (1024, 1024)  # what a run whose images are yet to come (`supir-mlx watch`) plans its weights for


@dataclass(frozen=True)
class LoadOptions:
    """Where the weights come from and what the user fixed; None / "auto" leave the choice to the planner."""

    weights: Path | None = None  # a `supir-mlx convert` folder; None: the downloaded (or given) checkpoints
    model: str = "v0Q"
    sdxl: str | None = None
    supir: str | None = None
    source: str = "pruned"
    captioner: str = "auto"
    captioner_weights: Path | None = None  # a converted LLaVA folder (its size is read from it)
    dtype: str | None = None  # diffusion dtype; None: float16 on Metal, float32 on the CPU backend
    vae_dtype: str | None = None
    quantize: int | None = None  # 8 or 4 to force it; None: only as far as the memory plans need
    memory_limit_gb: float | None = None
    offline: bool = False

    def __post_init__(self):
        if self.captioner not in CAPTIONER_CHOICES:
            raise ValueError(f"captioner must be one of {', '.join(CAPTIONER_CHOICES)}, not '{self.captioner}'")
        if self.quantize not in (None, 4, 8):
            raise ValueError(f"quantize must be 4 or 8, not {self.quantize}")
        if self.memory_limit_gb is not None:  # a NaN would slip through every comparison of the planner
            check_number("memory_limit (GB)", self.memory_limit_gb, 0.1, 100_000, "float")
        for name in ("weights", "captioner_weights"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, Path):
                object.__setattr__(self, name, Path(v).expanduser())


@dataclass(frozen=True)
class InputPlan:
    source: Any  # what was passed: a path or a (width, height)
    line: str  # "<name>: WxH -> output WxH (working size WxH)", or the reason the file cannot be read
    plan: Plan | None = None  # None: unreadable (reported when the batch reaches it) or does not fit
    error: str | None = None  # the planner's refusal


@dataclass(frozen=True)
class RunPlan:
    options: LoadOptions
    quant: QuantSpec | None  # what the diffusion weights are loaded with
    captioner: str | None  # "13b", "7b" or None (no input is captioned)
    captioner_path: Path | None  # the converted captioner a folder run uses (downloads resolve their own)
    inputs: tuple[InputPlan, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def fits(self) -> bool:
        return not any(p.error for p in self.inputs)

    def refusal(self) -> str | None:
        """One line naming the first input that cannot fit, or None."""
        bad = next((p for p in self.inputs if p.error), None)
        return None if bad is None else f"{_name(bad.source)}: {bad.error}"

    def __str__(self) -> str:
        lines = []
        for p in self.inputs:
            lines.append(p.line)
            if p.error:
                lines.append(f"  DOES NOT FIT: {p.error}")
            elif p.plan is not None:
                lines.append(str(p.plan))
        return "\n".join(lines)


def _name(source: Any) -> str:
    return str(source) if isinstance(source, (str, Path)) else f"{source[0]}x{source[1]} input"


def run_dtype(options: LoadOptions) -> str:
    from ..weights.loading import dtype_name
    from .restore import default_dtype

    return options.dtype or dtype_name(default_dtype())


def _captioner_candidates(options: LoadOptions) -> tuple[str | None, Path | None, tuple[str, ...]]:
    """(captioner for the planner: "auto", a size or None; the folder a converted-weights run reads; notes)."""
    if options.captioner == "none":
        return None, None, ()
    if options.captioner_weights is not None:
        from .restore import captioner_size

        return captioner_size(options.captioner_weights), options.captioner_weights, ()
    if options.weights is None:  # downloads fetch whichever size the plan picks
        return options.captioner, None, ()
    from ..weights.llava_convert import default_llava_dir

    wanted = ("13b", "7b") if options.captioner in ("auto", "13b") else ("7b",)
    found = [s for s in wanted if (default_llava_dir(s) / "config.json").is_file()]
    if not found:
        d = default_llava_dir(wanted[0])
        return None, None, (f"no converted captioner in {d}; restoring without captions (give --prompt, a sidecar "
                            ".txt, or convert LLaVA with `supir-mlx convert-llava`)",)
    if len(found) == 2 and options.captioner == "auto":
        return "auto", None, ()
    return found[0], default_llava_dir(found[0]), ()


def _input_size(source: Any, settings: RestoreSettings, draft: bool) -> tuple[int, int]:
    if isinstance(source, (str, Path)):
        from ..io.images import open_header

        with open_header(source) as im:
            w, h = im.size
    else:
        w, h = source
    if draft:
        from .restore import draft_box

        left, top, right, bottom = draft_box(w, h, settings)
        w, h = right - left, bottom - top
    return w, h


def plan_run(
    inputs: Sequence[Any],
    settings: RestoreSettings,
    options: LoadOptions = LoadOptions(),
    *,
    captioned: Sequence[bool] | bool = True,
    draft: bool = False,
) -> RunPlan:
    """Plan a batch before anything is loaded: `inputs` are image paths (only headers are read) or (width,
    height) pairs; `captioned[i]` says whether input i gets LLaVA's caption (False: a prompt or sidecar).

    Raises ValueError (ConvertError) for a converted folder that cannot be used; an input that cannot be read
    or cannot fit is recorded in its InputPlan (and `RunPlan.refusal()`), never raised.
    """
    from ..config import SUPIRConfig
    from ..io.images import ImageError
    from ..pipeline.preprocess import processing_size

    if options.weights is not None:
        from ..weights.convert import check_folder

        config = check_folder(options.weights)
    else:
        config = SUPIRConfig.sdxl_v0()
    flags = [captioned] * len(inputs) if isinstance(captioned, bool) else list(captioned)
    cap, cap_path, notes = _captioner_candidates(options) if any(flags) else (None, None, ())
    dtype = run_dtype(options)
    fixed_quant = QuantSpec(bits=options.quantize) if options.quantize else None

    sized = []
    for source, flag in zip(inputs, flags):
        try:
            w, h = _input_size(source, settings, draft)
        except ImageError as e:  # reported (and skipped) when the batch reaches this file
            sized.append((source, str(e), None, flag))
            continue
        W, H, h0, w0 = processing_size(w, h, settings.upscale, settings.min_size)
        sized.append((source, f"{_name(source)}: {w}x{h} -> output {w0}x{h0} (working size {W}x{H})", (W, H), flag))

    def one(size, quant, captioner) -> Plan:
        return plan(*size, config=config, dtype=dtype, captioner=captioner, memory_limit_gb=options.memory_limit_gb,
                    quant=quant, unet_tile=settings.tile_size)

    # 1. each input on its own: the best it could get
    bits, sizes = None, set()
    for source, _, size, flag in sized:
        if size is None:
            continue
        try:
            p = one(size, fixed_quant or "auto", cap if flag else None)
        except MemoryPlanError:
            continue  # refused again below, with the batch's choices
        if p.quant is not None and (bits is None or p.quant.bits < bits):
            bits = p.quant.bits
        if p.captioner:
            sizes.add(p.captioner)
    # 2. the weights are loaded once: the strongest quantization and the smaller captioner any input needs
    quant = fixed_quant or (QuantSpec(bits=bits) if bits else None)
    captioner = "7b" if "7b" in sizes else ("13b" if "13b" in sizes else None)
    if captioner is None and cap not in (None, "auto") and any(f for *_, f in sized):
        captioner = cap  # nothing fits: the refusal below names the captioner the user fixed
    if options.weights is not None and captioner is not None and cap_path is None:
        from ..weights.llava_convert import default_llava_dir

        cap_path = default_llava_dir(captioner)
    # 3. every input again with those choices: exactly what Restorer.restore will compute for it
    planned = []
    for source, line, size, flag in sized:
        if size is None:
            planned.append(InputPlan(source, line))
            continue
        try:
            planned.append(InputPlan(source, line, one(size, quant, captioner if flag else None)))
        except MemoryPlanError as e:
            planned.append(InputPlan(source, line, error=str(e)))
    return RunPlan(options, quant, captioner, cap_path, tuple(planned), notes)


def load_restorer(run: RunPlan, log: Callable[[str], None] = print):
    """The Restorer the plans assumed: the same weights, quantization, dtype, memory limit and captioner."""
    from .restore import Restorer

    o = run.options
    bits = run.quant.bits if run.quant else None
    if o.weights is not None:
        return Restorer.from_weights(o.weights, captioner=run.captioner_path, dtype=run_dtype(o), vae_dtype=o.vae_dtype,
                                     memory_limit_gb=o.memory_limit_gb, quantize=bits, log=log)
    r = Restorer.from_pretrained(o.model, sdxl=o.sdxl, supir=o.supir, source=o.source,
                                 captioner="none" if o.captioner_weights or not run.captioner else run.captioner,
                                 dtype=run_dtype(o), vae_dtype=o.vae_dtype, quantize=bits, offline=o.offline,
                                 memory_limit_gb=o.memory_limit_gb, log=log)
    if o.captioner_weights is not None and run.captioner:
        r.captioner_path = o.captioner_weights
    return r
