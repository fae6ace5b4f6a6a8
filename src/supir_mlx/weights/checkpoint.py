"""Reading checkpoint files into numpy arrays without PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def read_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a `.safetensors` file, by official key."""
    from safetensors.numpy import load_file

    return load_file(str(path))
