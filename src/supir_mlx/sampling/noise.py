"""Explicit noise sources: every random draw of a run goes through one of these.

`SeededNoise` makes a run reproducible from one seed; `ReplayNoise` feeds in draws made elsewhere (the
official torch draws recorded in the reference fixtures) so our sampler can be checked number for number.

The DPM++ sampler's noise is the same kind of draw. Officially it comes from k-diffusion's Brownian tree:
each call returns (W(sigma_next) - W(sigma)) / sqrt(sigma - sigma_next) for a Brownian motion W over the
schedule's disjoint intervals [sigma_next, sigma]; Brownian increments over disjoint intervals are
independent Gaussians with variance equal to the interval length, so each normalised output is N(0, 1)
and independent of the others. i.i.d. standard normal draws have exactly that joint distribution; the
tree only matters for adaptive solvers that revisit sub-intervals, which these samplers never do.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import mlx.core as mx
import numpy as np


class NoiseSource(Protocol):
    def next(self, shape: tuple[int, ...], dtype: mx.Dtype = mx.float32) -> mx.array:
        """The next standard-normal draw of this shape."""
        ...


class SeededNoise:
    """Standard-normal draws from one seed: draw k depends only on (seed, k), whatever the shapes before it.

    Draws are made in float32 and then cast, so an fp16 run sees the same noise as an fp32 run.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.count = 0
        self._key = mx.random.key(seed)

    def next(self, shape: tuple[int, ...], dtype: mx.Dtype = mx.float32) -> mx.array:
        self._key, key = mx.random.split(self._key)
        self.count += 1
        return mx.random.normal(tuple(shape), dtype=mx.float32, key=key).astype(dtype)


class NoiseExhausted(RuntimeError):
    """A replayed run asked for more draws than were supplied."""


class ReplayNoise:
    """Replays given draws in call order; each must have the requested shape."""

    def __init__(self, draws: Sequence[np.ndarray | mx.array]):
        self.draws = list(draws)
        self.count = 0

    def next(self, shape: tuple[int, ...], dtype: mx.Dtype = mx.float32) -> mx.array:
        if self.count >= len(self.draws):
            raise NoiseExhausted(f"draw {self.count} requested (shape {tuple(shape)}) but only {len(self.draws)} supplied")
        draw = self.draws[self.count]
        if tuple(draw.shape) != tuple(shape):
            raise ValueError(f"replayed draw {self.count} has shape {tuple(draw.shape)}, the sampler needs {tuple(shape)}")
        self.count += 1
        return mx.array(draw).astype(dtype)

    @property
    def remaining(self) -> int:
        return len(self.draws) - self.count
