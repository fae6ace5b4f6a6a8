"""Restore settings, the official defaults and the presets.

Every knob of the official `batchify_sample` / test.py / gradio_demo is here, named after what it
does, with the official name in the comment. A preset is a set of overrides on the defaults; any
knob given explicitly wins over the preset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ..config import DEFAULT_NEGATIVE_PROMPT, DEFAULT_POSITIVE_PROMPT

SAMPLERS = ("edm", "dpmpp")
COLOR_FIXES = ("wavelet", "adain", "none")
MODELS = ("v0Q", "v0F")


class SettingsError(ValueError):
    """An invalid restore setting; the message is one line naming the setting."""


@dataclass(frozen=True)
class RestoreSettings:
    # pre-processing (PIL2Tensor): scale by `upscale`, short side at least `min_size`, sides multiple of 64
    upscale: float = 1.0
    min_size: int = 1024
    # sampling (test.py defaults)
    sampler: str = "edm"  # RestoreEDMSampler; "dpmpp" = RestoreDPMPP2MSampler (Lightning bases)
    steps: int = 50  # edm_steps
    cfg: float = 4.0  # s_cfg (scale_min of LinearCFG when linear_cfg)
    cfg_start: float = 1.0  # spt_linear_CFG
    linear_cfg: bool = True  # linear_CFG
    control_scale: float = 1.0  # s_stage2
    control_start: float = 0.0  # spt_linear_s_stage2
    linear_control: bool = False  # linear_s_stage2
    restore_cfg: float = -1.0  # s_stage1 (restoration guidance toward the stage-1 latent; <= 0 is off)
    s_churn: float = 5.0
    s_noise: float = 1.01
    eta: float = 1.0  # DPM++ only
    color_fix: str = "wavelet"  # color_fix_type
    seed: int = 1234
    num_samples: int = 1
    # text
    prompt: str | None = None  # the caption; None = caption automatically (or empty without a captioner)
    caption_size: int = 512  # short side of the stage-1 image LLaVA is shown (test.py: PIL2Tensor fix_resize=512)
    positive_prompt: str = DEFAULT_POSITIVE_PROMPT  # a_prompt, appended to the caption
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT  # n_prompt
    # model
    model: str = "v0Q"  # SUPIR_sign
    # tiling (latent pixels for the sampler, image pixels for the VAE); None = chosen automatically
    tile_size: int | None = None
    tile_stride: int | None = None
    vae_encoder_tile: int | None = None
    vae_decoder_tile: int | None = None
    # face mode (gradio_demo_face.py): every face found is restored alone and pasted back into the background
    faces: bool = False
    face_size: int = 1024  # FaceRestoreHelper face_size: aligned crops, and the sampler canvas a face is padded to
    face_resolution: int = 1024  # face_resolution: the face is resized to this inside the canvas
    face_background: bool = True  # apply_bg: restore the background too (else the input stays behind the faces)
    face_prompt: str | None = None  # caption of every face; None = LLaVA on each face crop (empty without one)

    def validate(self) -> "RestoreSettings":
        """Every knob of the right type, finite and inside its documented range (RANGES); one line naming the first
        that is not. The CLI, the API (`Restorer.restore`), `--settings-from` records and other front ends all
        come through here before any work."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise SettingsError(msg)

        for name, (lo, hi, kind) in RANGES.items():
            v = getattr(self, name)
            if v is None and name in OPTIONAL:
                continue
            check_number(name, v, lo, hi, kind)
        for name in ("linear_cfg", "linear_control"):
            need(isinstance(getattr(self, name), bool), f"{_label(name)} must be true or false, got {getattr(self, name)!r}")
        for name in ("positive_prompt", "negative_prompt"):
            need(isinstance(getattr(self, name), str), f"{_label(name)} must be text, got {getattr(self, name)!r}")
        need(self.prompt is None or isinstance(self.prompt, str), f"prompt must be text, got {self.prompt!r}")
        need(self.sampler in SAMPLERS, f"sampler must be one of {', '.join(SAMPLERS)}, not '{self.sampler}'")
        need(self.color_fix in COLOR_FIXES, f"color fix must be one of {', '.join(COLOR_FIXES)}, not '{self.color_fix}'")
        need(self.model in MODELS, f"model must be one of {', '.join(MODELS)}, not '{self.model}'")
        need(self.eta > 0 or self.sampler != "dpmpp", "eta must be > 0 for the DPM++ sampler (eta 0 gives NaN officially)")
        need(self.sampler != "dpmpp" or self.num_samples == 1, "the DPM++ sampler runs one sample at a time (as officially)")
        if self.faces:
            need(self.num_samples == 1, "face mode restores one sample (num samples must be 1)")
            need(self.face_size >= 64 and self.face_size % 32 == 0, f"face size must be a multiple of 32 of at least 64, got {self.face_size}")
            need(64 <= self.face_resolution <= 2048 and self.face_resolution % 32 == 0,
                 f"face resolution must be a multiple of 32 between 64 and 2048, got {self.face_resolution}")
        if self.tile_size is not None:
            stride = self.tile_stride if self.tile_stride is not None else self.tile_size // 2
            need(0 < stride <= self.tile_size, f"tile stride must be in (0, tile size], got {stride}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "RestoreSettings":
        names = {f.name for f in fields(RestoreSettings)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SettingsError(f"unknown settings: {', '.join(unknown)}")
        return RestoreSettings(**d).validate()

    def updated(self, **overrides: Any) -> "RestoreSettings":
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


# The documented range of every numeric knob: name -> (lowest, highest, "int" or "float"); both ends included.
# Wide enough for every official setting and experiment, narrow enough that a typo (1e30, -1) or a NaN is caught.
RANGES: dict[str, tuple[float, float, str]] = {
    "upscale": (0.01, 16, "float"),
    "min_size": (64, 8192, "int"),
    "steps": (1, 1000, "int"),
    "cfg": (0, 50, "float"),
    "cfg_start": (0, 50, "float"),
    "control_scale": (0, 5, "float"),
    "control_start": (0, 5, "float"),
    "restore_cfg": (-1, 20, "float"),  # <= 0 turns it off (the official default is -1)
    "s_churn": (0, 100, "float"),
    "s_noise": (0.5, 2, "float"),
    "eta": (0, 10, "float"),
    "seed": (0, 2**63 - 1, "int"),
    "num_samples": (1, 64, "int"),
    "caption_size": (64, 4096, "int"),
    "tile_size": (8, 1024, "int"),  # latent pixels
    "tile_stride": (1, 1024, "int"),
    "vae_encoder_tile": (64, 16384, "int"),  # image pixels
    "vae_decoder_tile": (8, 2048, "int"),  # latent pixels
}
OPTIONAL = {"tile_size", "tile_stride", "vae_encoder_tile", "vae_decoder_tile"}  # None: chosen automatically


def _label(name: str) -> str:
    return name.replace("_", " ")


def check_number(name: str, v: Any, lo: float, hi: float, kind: str) -> None:
    """Refuse (one line naming the setting) anything but a finite number of the right kind within [lo, hi]."""
    import math
    import numbers

    is_int = isinstance(v, numbers.Integral) and not isinstance(v, bool)
    if kind == "int" and not is_int:
        raise SettingsError(f"{_label(name)} must be a whole number in [{lo:g}, {hi:g}], got {v!r}")
    if kind == "float" and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
        raise SettingsError(f"{_label(name)} must be a number in [{lo:g}, {hi:g}], got {v!r}")
    if not math.isfinite(v):
        raise SettingsError(f"{_label(name)} must be a finite number in [{lo:g}, {hi:g}], got {v}")
    if not lo <= v <= hi:
        raise SettingsError(f"{_label(name)} must be in [{lo:g}, {hi:g}], got {v:g}")


# Official presets (gradio_demo option files; the Lightning yaml's default_setting).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "quality": dict(cfg=7.5, cfg_start=4.0, s_churn=5.0, s_noise=1.003, linear_cfg=True, model="v0Q"),
    "fidelity": dict(cfg=4.0, cfg_start=1.0, s_churn=5.0, s_noise=1.003, linear_cfg=True, model="v0F"),
    "lightning": dict(
        sampler="dpmpp", steps=8, cfg=2.0, cfg_start=2.0, linear_cfg=True, s_churn=0.0, s_noise=1.003, model="v0Q"
    ),
    "lightning-fidelity": dict(
        sampler="dpmpp", steps=8, cfg=1.5, cfg_start=1.5, linear_cfg=True, s_churn=0.0, s_noise=1.003, model="v0F"
    ),
}


def settings_for(preset: str = "default", **overrides: Any) -> RestoreSettings:
    """The preset's settings with every explicitly given (non-None) knob overriding it."""
    if preset not in PRESETS:
        raise SettingsError(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    return RestoreSettings(**PRESETS[preset]).updated(**overrides).validate()
