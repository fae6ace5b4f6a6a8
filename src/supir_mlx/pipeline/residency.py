"""Which parts of a model hold their weights in memory.

A staged memory plan keeps only what each stage needs: the VAE for stage 1 and decoding, the text encoders
for conditioning, the UNet + control encoder for sampling; the captioner drops its vision tower once the
image features exist, before the language model's KV cache grows. A released part's parameters become lazy reads
of the weight files again (`mx.load` reads nothing until evaluated), so releasing frees the memory at once
and using the part again reads it back: a few GB per image from the SSD, instead of a plan that cannot fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

SUPIR_PARTS = {"vae": ("first_stage_model.",), "text": ("conditioner.",), "denoiser": ("model.",)}


class Residency:
    def __init__(self, model, files: Iterable[str | Path], parts: dict[str, tuple[str, ...]] = SUPIR_PARTS,
                 loaded: bool = True):
        """`files`: safetensors files holding every parameter of `model` by MLX path, in their stored dtype
        (a converted folder's shards, or a quantized cache entry); `parts`: name -> parameter path prefixes.
        `loaded`: the parameters have been read (all parts resident); False when they are still lazy reads of
        `files` (nothing resident: each part is read when first used, so a staged run never holds them all).
        The parameters' current dtypes are kept: a part read back is cast exactly as it was when loaded."""
        self.model = model
        self.files = [str(f) for f in files]
        self.parts = parts
        self.dtypes = {k: v.dtype for k, v in tree_flatten(model.parameters())}
        self.resident = set(parts) if loaded else set()

    def _keys(self, part: str) -> list[str]:
        return [k for k in self.dtypes if k.startswith(self.parts[part])]

    def use(self, *parts: str) -> None:
        """Make exactly `parts` resident: release the others, read these back if they were released."""
        unknown = set(parts) - set(self.parts)
        if unknown:
            raise ValueError(f"unknown model parts {sorted(unknown)} (choose from {', '.join(self.parts)})")
        want = set(parts)
        drop = self.resident - want
        if drop:
            keys = {k for p in drop for k in self._keys(p)}
            lazy = {}
            for f in self.files:
                for k, v in mx.load(f).items():
                    if k in keys:
                        lazy[k] = v.astype(self.dtypes[k])
            if set(lazy) != keys:
                missing = sorted(keys - set(lazy))
                raise FileNotFoundError(f"the weight files no longer hold '{missing[0]}'; convert the weights again")
            from ..memory import release_freed  # (memory imports the pipeline package)

            self.model.update(tree_unflatten(list(lazy.items())))
            release_freed()
        for p in want - self.resident:
            params = dict(tree_flatten(self.model.parameters()))
            _read([params[k] for k in self._keys(p)])
        self.resident = want

    def use_all(self) -> None:
        self.use(*self.parts)


def _read(arrays: list[mx.array], chunk_bytes: int = 256 << 20) -> None:
    """Evaluate lazy weight reads a few hundred MB at a time: one graph over a whole part could read every
    stored tensor before casting any of them, holding both copies of the part."""
    group, size = [], 0
    for a in arrays:
        group.append(a)
        size += a.nbytes
        if size >= chunk_bytes:
            mx.eval(group)
            group, size = [], 0
    mx.eval(group)
