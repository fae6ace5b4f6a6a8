"""Work spread over several processes or Macs with MLX's own distributed layer (mx.distributed, via mlx.launch).

    mlx.launch --hosts 10.0.0.1,10.0.0.2 -- supir-mlx restore scans/ -o /Volumes/shared/restored

A batch gives each rank a deterministic share of the inputs still to do (`share`); a single image instead has
the tiles of every sampling step divided among the ranks (`Restorer.restore(group=...)`). Ranks agree only
through collective operations (all_sum) at the start and the end of a batch and once per sampling step: no queue,
server or protocol of our own. Every rank writes its own outputs atomically into the shared output folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence, TypeVar

import mlx.core as mx

T = TypeVar("T")


def world():
    """The distributed group when this process is one of several started by mlx.launch (or mpirun), else None."""
    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


# Why the group stopped working: once a peer is lost the ring backend fails that collective and never completes
# another one, so every later collective must fail at once instead of waiting forever.
_lost: str | None = None


def all_sum(x: mx.array, group) -> mx.array:
    """mx.distributed.all_sum, evaluated; RuntimeError once a rank is gone (now and for every later call)."""
    global _lost
    if _lost is not None:
        raise RuntimeError(_lost)
    try:
        out = mx.distributed.all_sum(x, group=group)
        mx.eval(out)
        return out
    except RuntimeError as e:
        _lost = f"lost the other ranks ({e})"
        raise RuntimeError(_lost) from None


def _all_sum(values: Sequence[int], group) -> list[int]:
    # int32 sums are exact; a leading 1 keeps the array non-empty
    return all_sum(mx.array([1, *values], dtype=mx.int32), group).tolist()[1:]


def agree_done(done: Sequence[bool], group) -> list[bool]:
    """Which items count as finished: done on any rank's view at the start. Every rank gets the same list, so
    all ranks share out the same pending items even when a quick rank finishes one before a slow rank looks.
    Raises ValueError when the ranks see batches of different lengths (different inputs)."""
    n = _all_sum([len(done)], group)[0]
    if n != len(done) * group.size():
        raise ValueError(f"the ranks see different inputs ({len(done)} here, {n} in all over {group.size()} ranks): "
                         "give every Mac the same paths (a shared folder)")
    return [v > 0 for v in _all_sum([int(d) for d in done], group)]


def share(pending: Sequence[T], group) -> list[T]:
    """This rank's share of the pending items: every size-th one, starting at its rank (deterministic, and
    balanced to within one item)."""
    return list(pending[group.rank()::group.size()])


def total(counts: Sequence[int], group) -> list[int]:
    """Per-rank counts summed over all ranks (also a barrier: it returns once every rank has reached it).
    Raises RuntimeError when a rank is gone."""
    return _all_sum(counts, group)


def barrier(group) -> bool:
    """Wait until every rank gets here; False when a rank is gone."""
    try:
        _all_sum([], group)
        return True
    except RuntimeError:
        return False


@dataclass
class Shares:
    """How a batch is divided: `mine` are this rank's items; with a single pending image (`tiles`) every rank
    takes it and divides its sampling tiles instead."""

    group: object
    items: list  # every BatchItem of the batch, as every rank sees it
    done: list[bool]  # agreed: finished before the start
    mine: list
    tiles: bool

    @property
    def rank(self) -> int:
        return self.group.rank()


def plan_shares(items: list, group, overwrite: bool = False) -> Shares:
    """Agree on what is done and give this rank its share (see `agree_done`, `share`)."""
    done = agree_done([it.output.exists() and not overwrite for it in items], group)
    pending = [it for it, d in zip(items, done) if not d]
    tiles = len(pending) == 1
    return Shares(group, items, done, pending if tiles else share(pending, group), tiles)


@dataclass
class CombinedSummary:
    """A batch's counts summed over the ranks."""

    done: int
    skipped: int
    failed: int
    interrupted: bool
    ranks: int

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted

    def line(self) -> str:
        s = f"{self.done} done, {self.skipped} skipped, {self.failed} failed ({self.ranks} ranks)"
        return s + (" (interrupted: run the same command again to resume)" if self.interrupted else "")


def run_shares(shares: Shares, process_fn, *, overwrite: bool = False, on_event=None) -> CombinedSummary:
    """`run_batch` on this rank's share; rank 0 reports the whole plan, what was done before, and the summary
    combined over all ranks, which every rank returns. With `tiles` only rank 0's outcome counts (every rank
    restores the same image)."""
    from .events import Event
    from .io.batch import run_batch

    notify = on_event or (lambda _: None)
    rank, size = shares.rank, shares.group.size()
    t0 = time.perf_counter()
    if rank == 0:
        pending = [it for it, d in zip(shares.items, shares.done) if not d]
        # the rank restoring each pending item (`share` gives pending item k to rank k % size); tiles: all, rank 0 writes
        owner = {it.index: 0 if shares.tiles else k % size for k, it in enumerate(pending)}
        notify(Event("plan", {"count": len(shares.items), "ranks": size,
                              "items": [{**it.tags(), "rank": owner.get(it.index)} for it in shares.items]}))
        for it, d in zip(shares.items, shares.done):
            if d:
                notify(Event("skipped", {**it.tags(), "reason": "output exists"}))

    def forward(event) -> None:
        if event.kind not in ("plan", "summary"):
            notify(event)

    mine = run_batch(shares.mine, process_fn, overwrite=overwrite, on_event=forward)
    counts = [len(mine.done), len(mine.skipped), len(mine.failed), int(mine.interrupted)]
    if shares.tiles and rank != 0:
        counts = [0, 0, 0, counts[3]]
    try:
        done, skipped, failed, interrupted = total(counts, shares.group)
    except RuntimeError as e:  # a rank was killed or crashed: its finished outputs are on disk, a rerun does the rest
        notify(Event("error", {"message": f"{e}: this rank's outputs are complete; run the same command again to "
                                          "finish the batch"}))
        return CombinedSummary(counts[0], counts[1], counts[2], True, size)
    combined = CombinedSummary(done, skipped + sum(shares.done), failed, interrupted > 0, size)
    if rank == 0:
        notify(Event("summary", {"done": combined.done, "skipped": combined.skipped, "failed": combined.failed,
                                 "interrupted": combined.interrupted, "seconds": round(time.perf_counter() - t0, 3),
                                 "ranks": size}))
    return combined
