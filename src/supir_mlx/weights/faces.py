"""Loading the face-mode networks (RetinaFace detector, ParseNet parser) from facexlib checkpoints.

facexlib saves the detector from a DataParallel wrapper, so its keys carry a 'module.' prefix that
`init_detection_model` strips; the parser's keys are plain. Both load strictly through `load_official`
(BatchNorm's `num_batches_tracked` counters are the only keys ignored).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Mapping

import mlx.core as mx
import numpy as np

from ..models.parsenet import ParseNet, ParseNetConfig
from ..models.retinaface import RetinaFace, RetinaFaceConfig
from .checkpoint import read_checkpoint
from .loading import load_official

DATA_PARALLEL_PREFIX = "module."


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
