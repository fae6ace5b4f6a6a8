"""The face-mode networks (RetinaFace detector, ParseNet parser): facexlib checkpoints, converted MLX folders.

facexlib saves the detector from a DataParallel wrapper, so its keys carry a 'module.' prefix that
`init_detection_model` strips; the parser's keys are plain. Both load strictly through `load_official`
(BatchNorm's `num_batches_tracked` counters are the only keys ignored). Like the diffusion weights, the
release files are converted once into an MLX folder (`retinaface.safetensors`, `parsenet.safetensors` and a
`config.json` with both architectures) in the weight cache; `restore --face-weights DIR` takes such a folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Mapping

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..models.parsenet import ParseNet, ParseNetConfig
from ..models.retinaface import RetinaFace, RetinaFaceConfig
from .checkpoint import read_checkpoint
from .loading import load_official

DATA_PARALLEL_PREFIX = "module."
FACES_FORMAT, FACES_VERSION = "supir-mlx-faces", 1
FILES = {"retinaface": "retinaface.safetensors", "parsenet": "parsenet.safetensors"}


class FaceWeightsError(ValueError):
    """A face-weights folder that cannot be used (one line, says what to do)."""


class Unprefixed(Mapping[str, np.ndarray]):
    """A checkpoint seen without DataParallel's 'module.' key prefix (lazily: nothing is read)."""

    def __init__(self, weights: Mapping[str, np.ndarray]):
        self.weights = weights
        self.keys_ = {(k[len(DATA_PARALLEL_PREFIX) :] if k.startswith(DATA_PARALLEL_PREFIX) else k): k for k in weights}

    def __getitem__(self, key: str) -> np.ndarray:
        return self.weights[self.keys_[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)

    def shape(self, key: str) -> tuple[int, ...]:
        w = self.weights
        return tuple(w.shape(self.keys_[key])) if callable(getattr(w, "shape", None)) else np.shape(w[self.keys_[key]])

    def release(self, key: str) -> None:
        if callable(getattr(self.weights, "release", None)):
            self.weights.release(self.keys_[key])


def _weights(source: str | Path | Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    return Unprefixed(read_checkpoint(source) if isinstance(source, (str, Path)) else source)


def load_retinaface(source, cfg: RetinaFaceConfig = RetinaFaceConfig(), dtype: mx.Dtype = mx.float32) -> RetinaFace:
    """RetinaFace from a facexlib checkpoint (path or mapping), strictly, in eval mode (running BN statistics)."""
    model = RetinaFace(cfg)
    load_official(model, _weights(source), dtype=dtype)
    model.eval()
    return model


def load_parsenet(source, cfg: ParseNetConfig = ParseNetConfig(), dtype: mx.Dtype = mx.float32) -> ParseNet:
    model = ParseNet(cfg)
    load_official(model, _weights(source), dtype=dtype)
    model.eval()
    return model


def convert_faces(
    detector, parser, out: str | Path,
    detector_cfg: RetinaFaceConfig = RetinaFaceConfig(), parser_cfg: ParseNetConfig = ParseNetConfig(),
) -> Path:
    """Both networks strictly loaded from facexlib checkpoints (paths or mappings), written as an MLX folder
    (made under a temporary name, renamed when complete)."""
    out = Path(out)
    models = {"retinaface": load_retinaface(detector, detector_cfg), "parsenet": load_parsenet(parser, parser_cfg)}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, model in models.items():
        mx.save_safetensors(str(tmp / FILES[name]), dict(tree_flatten(model.parameters())))
    config = {"format": FACES_FORMAT, "version": FACES_VERSION, "retinaface": asdict(detector_cfg), "parsenet": asdict(parser_cfg)}
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def load_faces(directory: str | Path) -> tuple[RetinaFace, ParseNet]:
    """(detector, parser) from a converted folder, strictly (every parameter present and of its shape)."""
    directory = Path(directory)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise FaceWeightsError(f"{directory}: not a face-weights folder (no readable config.json)") from None
    if config.get("format") != FACES_FORMAT or config.get("version") != FACES_VERSION:
        raise FaceWeightsError(f"{directory}: not a face-weights folder of this version; convert the facexlib files again")
    detector = RetinaFace(RetinaFaceConfig.from_dict(config["retinaface"]))
    parser = ParseNet(ParseNetConfig.from_dict(config["parsenet"]))
    for name, model in (("retinaface", detector), ("parsenet", parser)):
        try:
            model.load_weights(str(directory / FILES[name]), strict=True)
        except (OSError, ValueError) as e:
            raise FaceWeightsError(f"{directory / FILES[name]}: {str(e).splitlines()[0]}") from None
        model.eval()
    return detector, parser


def ensure_faces(
    detector_file: Path, parser_file: Path, root: Path | None = None,
    detector_cfg: RetinaFaceConfig = RetinaFaceConfig(), parser_cfg: ParseNetConfig = ParseNetConfig(),
) -> Path:
    """The converted folder for the two release files, converting them once (keyed by their names and content
    and the architectures)."""
    from .cache import cache_root
    from .convert import fingerprint

    identity = [FACES_VERSION, asdict(detector_cfg), asdict(parser_cfg)]
    identity += [[p.name, p.stat().st_size, fingerprint(p)] for p in (detector_file, parser_file)]
    entry = (root or cache_root()) / f"faces-{hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]}"
    if not (entry / "config.json").is_file():
        convert_faces(detector_file, parser_file, entry, detector_cfg, parser_cfg)
    return entry
