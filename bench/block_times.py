"""Wall time per block type, each block's own (without the timed blocks nested in it): the one timer that
profile_blocks.py (supir-mlx) and official_worker.py --profile (PyTorch) both wrap around their blocks.
Plain Python, so it imports in either interpreter."""

from __future__ import annotations

import time
from typing import Callable


class BlockTimes:
    """`before(args)` runs ahead of the clock (e.g. evaluating lazy inputs), `after(out)` inside it (e.g. evaluating
    the lazy output, so the block's own work is what is timed)."""

    def __init__(self, before: Callable = lambda args: None, after: Callable = lambda out: None) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.stack: list[float] = []  # time spent in timed blocks nested in each open block
        self.before, self.after = before, after

    def wrap(self, category: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            self.before((*args, *kwargs.values()))
            self.stack.append(0.0)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.after(out)
            elapsed = time.perf_counter() - start
            self.seconds[category] = self.seconds.get(category, 0.0) + elapsed - self.stack.pop()
            self.calls[category] = self.calls.get(category, 0) + 1
            if self.stack:
                self.stack[-1] += elapsed
            return out

        return timed
