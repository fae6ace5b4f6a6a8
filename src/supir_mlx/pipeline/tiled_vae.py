"""The official tiled VAE (SUPIR/utils/tilevae.py `VAEHook`, as `SUPIRModel.init_tile_vae` installs it).

The image (or latent) is cut into tiles padded by 32 pixels (encoder) or 11 latent pixels (decoder),
and the network runs as a flat list of operations over all tiles in lock-step. Every GroupNorm is a
barrier: each tile stops there, and once all tiles have arrived, the norm is applied to every tile
with statistics shared across tiles: the pixel-count-weighted means of the per-tile group means and
(biased) variances — not a pooled variance. The mid-block attention sees one tile at a time. The
valid centre of each finished tile is cropped and the crops are stitched. The result therefore
differs from the untiled network, and reproduces the official numbers (fast mode and colour-fix
mode of VAEHook are off in SUPIR and are not implemented).

Memory: between two norms every tile's state (its activation, and the residual branch when one is
pending) must be kept, about the full-image activation plus the overlap of the padded tiles, so in RAM
the peak grows with the image. With `spill=True` the states live in a scratch file instead and only
one tile's working set is in RAM: a bounded peak for any image size, paid for in disk traffic (see
`spill_traffic`). The numbers are the same either way: the same operations run on the same values.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import numpy as np

from ..distributed import all_sum
from ..models.layers import GroupNorm, group_statistics
from ..models.vae import AutoencoderKL, Decoder, Encoder, ResnetBlock

ENCODER_PAD = 32  # image pixels
DECODER_PAD = 11  # latent pixels
GROUPS = 32
SCALE = 8  # pixels per latent pixel (the official hook hard-codes it too)


@dataclass(frozen=True)
class Tile:
    """Boxes as (x1, x2, y1, y2), the official order: `src` in input pixels, `dst` in output pixels."""

    src: tuple[int, int, int, int]
    dst: tuple[int, int, int, int]


def _best_tile_size(lower: int, upper: int) -> int:
    """Round `lower` up to the coarsest multiple of 32, 16, ..., 2 that stays <= `upper`."""
    divider = 32
    while divider >= 2:
        if lower % divider == 0:
            return lower
        candidate = lower - lower % divider + divider
        if candidate <= upper:
            return candidate
        divider //= 2
    return lower


def split_tiles(height: int, width: int, tile_size: int, is_decoder: bool) -> tuple[list[Tile], int]:
    """The official `VAEHook.split_tiles`: the tiles in row-major order and the number of columns."""
    pad = DECODER_PAD if is_decoder else ENCODER_PAD
    rows = max(math.ceil((height - 2 * pad) / tile_size), 1)
    cols = max(math.ceil((width - 2 * pad) / tile_size), 1)
    tile_h = _best_tile_size(math.ceil((height - 2 * pad) / rows), tile_size)
    tile_w = _best_tile_size(math.ceil((width - 2 * pad) / cols), tile_size)

    def scale(v: int) -> int:
        return v * SCALE if is_decoder else v // SCALE

    tiles = []
    for i in range(rows):
        for j in range(cols):
            x1, x2 = pad + j * tile_w, min(pad + (j + 1) * tile_w, width)
            y1, y2 = pad + i * tile_h, min(pad + (i + 1) * tile_h, height)
            # the image border needs no padding: border tiles extend their valid region to it
            dst = (
                x1 if x1 > pad else 0,
                x2 if x2 < width - pad else width,
                y1 if y1 > pad else 0,
                y2 if y2 < height - pad else height,
            )
            src = (max(0, x1 - pad), min(width, x2 + pad), max(0, y1 - pad), min(height, y2 + pad))
            tiles.append(Tile(src, tuple(scale(v) for v in dst)))  # type: ignore[arg-type]
    return tiles, cols


def needs_tiling(height: int, width: int, tile_size: int, is_decoder: bool) -> bool:
    pad = DECODER_PAD if is_decoder else ENCODER_PAD
    return max(height, width) > 2 * pad + tile_size


# One step of the flat network: ("apply", f) h = f(h); ("res", f) residual = f(h); ("add", None)
# h = h + residual; ("norm", gn) and ("norm_silu", gn) the GroupNorm barrier, the second with the SiLU
# that follows it folded into the normalising pass (the official queues the SiLU as its own step; the
# values are the same, and a separate SiLU is one more pass over the activations, on MLX's CPU backend a
# single-threaded one).
Op = tuple[str, Callable | GroupNorm | None]
BARRIERS = ("norm", "norm_silu")


def _resblock_ops(block: ResnetBlock) -> list[Op]:
    return [
        ("res", block.shortcut),
        ("norm_silu", block.norm1),
        ("apply", block.conv1),
        ("norm_silu", block.norm2),
        ("apply", block.conv2),
        ("add", None),
    ]


def _mid_ops(mid) -> list[Op]:
    attn = [("res", lambda h: h), ("norm", mid.attn_1.norm), ("apply", mid.attn_1.attend), ("add", None)]
    return _resblock_ops(mid.block_1) + attn + _resblock_ops(mid.block_2)


def network_ops(net: Encoder | Decoder) -> list[Op]:
    """The official task queue of an encoder or decoder, in execution order."""
    ops: list[Op] = [("apply", net.conv_in)]
    if isinstance(net, Decoder):
        ops += _mid_ops(net.mid)
        levels, resample = list(reversed(net.up)), "upsample"
    else:
        levels, resample = net.down, "downsample"
    for level in levels:
        for block in level.block:
            ops += _resblock_ops(block)
        if resample in level:
            ops.append(("apply", level[resample]))
    if isinstance(net, Encoder):
        ops += _mid_ops(net.mid)
    return ops + [("norm_silu", net.norm_out), ("apply", net.conv_out)]


def _segments(ops: list[Op]) -> list[list[Op]]:
    """Cut the op list before every norm, the barriers: each segment after the first starts with its norm.

    A residual branch taken just before a norm moves behind the cut, to the head of the segment (it is a
    function of the same h), so that barrier holds h alone instead of h plus the branch.
    """
    segments: list[list[Op]] = [[]]
    for op in ops:
        if op[0] in BARRIERS:
            segments.append([segments[-1].pop()] if segments[-1][-1][0] == "res" else [])
        segments[-1].append(op)
    return segments


def _pending_residuals(segments: list[list[Op]]) -> list[bool]:
    """Whether a residual branch is still waiting for its add at the barrier after each segment."""
    pending, out = False, []
    for segment in segments:
        for kind, _ in segment:
            pending = kind == "res" or (pending and kind != "add")
        out.append(pending)
    return out


def _run(segment: list[Op], h: mx.array, res: mx.array | None, stats) -> tuple[mx.array, mx.array | None]:
    for kind, f in segment:
        if kind in BARRIERS:
            h = f.normalize(h, *stats, silu=kind == "norm_silu")  # type: ignore[union-attr]
        elif kind == "res":
            res = f(h)  # type: ignore[operator]
        elif kind == "add":
            h, res = h + res, None
        else:
            h = f(h)  # type: ignore[operator]
    return h, res


def _write(f, a: mx.array) -> tuple[int, tuple[int, ...], mx.Dtype]:
    offset = f.seek(0, os.SEEK_END)
    a = mx.contiguous(a)  # a strided view (the CPU convolution's output drops padding columns) has no flat buffer
    mx.eval(a)
    f.write(memoryview(a))
    return offset, tuple(a.shape), a.dtype


def _read(f, offset: int, shape: tuple[int, ...], dtype: mx.Dtype) -> mx.array:
    buf = np.empty(math.prod(shape) * dtype.size, np.uint8)
    f.seek(offset)
    if f.readinto(buf) != buf.size:
        raise OSError(f"the tiled-VAE scratch file ended early at byte {offset}")
    return mx.array(buf).view(dtype).reshape(shape)


@dataclass
class _TileStates:
    """Each tile's (h, pending residual) at the last stored barrier (spilled: h, as no residual is pending).

    In RAM a tile's slot is emptied when it is read, so its old and new state never coexist. Spilled, the
    states of one barrier go to a fresh scratch file that replaces the previous one once complete; the files
    are unlinked at creation (`TemporaryFile`), so the OS reclaims them even if the process is killed.
    """

    ram: list  # before the first spilled barrier: the input tiles, lazy slices of the input
    spill: bool
    file: object = None
    where: dict = field(default_factory=dict)
    next: object = None
    next_where: dict = field(default_factory=dict)

    def get(self, i: int) -> tuple[mx.array, mx.array | None]:
        if self.file is not None:
            return _read(self.file, *self.where[i]), None
        state = self.ram[i]
        if not self.spill:
            self.ram[i] = None
        return state

    def put(self, i: int, h: mx.array, res: mx.array | None) -> None:
        if not self.spill:
            self.ram[i] = (h, res)
            return
        if res is not None:
            raise ValueError("a barrier with a pending residual is recomputed, not spilled")
        if self.next is None:
            self.next = tempfile.TemporaryFile()  # noqa: SIM115 - lives until commit() or close()
        self.next_where[i] = _write(self.next, h)

    def commit(self) -> None:
        """Every tile has stored its state at this barrier: the previous barrier's file can go."""
        if self.next is not None:
            if self.file is not None:
                self.file.close()
            self.file, self.where, self.next, self.next_where, self.ram = self.next, self.next_where, None, {}, []

    def close(self) -> None:
        for f in (self.file, self.next):
            if f is not None:
                f.close()


def _crop(h: mx.array, tile: Tile, is_decoder: bool) -> mx.array:
    """The part of a finished tile that lands in its `dst` box (the official crop_valid_region)."""
    padded = [v * SCALE if is_decoder else v // SCALE for v in tile.src]
    m = [d - p for d, p in zip(tile.dst, padded)]
    out = h[:, m[2] : h.shape[1] + m[3], m[0] : h.shape[2] + m[1], :]
    want = (tile.dst[3] - tile.dst[2], tile.dst[1] - tile.dst[0])
    if tuple(out.shape[1:3]) != want:
        raise ValueError(
            f"tile {tile.src} gives a {tuple(out.shape[1:3])} block where {want} is expected: "
            f"image sides and tile sizes must be multiples of {SCALE}"
        )
    return out


def tiled_forward(net: Encoder | Decoder, x: mx.array, tile_size: int, spill: bool = False, group=None) -> mx.array:
    """`net(x)` the way VAEHook runs it: untiled when max(H, W) <= 2 * pad + tile_size, else tiled.

    `spill` keeps the tile states in a scratch file (in the system temporary folder, TMPDIR) instead of
    RAM. It stores only the barriers without a pending residual (for the SDXL decoder 42% of the writes and
    61% of the traffic of storing every barrier); the barriers in between are recomputed from the stored
    one: one more convolution per ResNet block, cheaper than writing and reading two more full-resolution
    activations.

    `group` (mx.distributed, several processes) divides the tiles among the ranks: at every barrier the per-tile
    statistics, and at the end the crops, travel to every rank in an all_sum over arrays in which each tile's
    values are non-zero on one rank only (exact), and every rank combines them in tile order: the result is
    bit-identical to the single-process one.
    """
    if not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"tile size must be a positive integer, got {tile_size!r}")
    is_decoder = isinstance(net, Decoder)
    _, height, width, _ = x.shape
    if not needs_tiling(height, width, tile_size, is_decoder):
        return net(x)
    tiles, cols = split_tiles(height, width, tile_size, is_decoder)
    if group is not None and not 1 < group.size() <= len(tiles):
        group = None  # alone, or more ranks than tiles: every rank runs every tile
    mine = range(len(tiles)) if group is None else range(group.rank(), len(tiles), group.size())
    segments = _segments(network_ops(net))
    pending = _pending_residuals(segments)
    inputs = [(x[:, t.src[2] : t.src[3], t.src[0] : t.src[1], :], None) for t in tiles]
    shared: list[tuple[mx.array, mx.array]] = []  # the statistics of every barrier so far
    crops: dict[int, mx.array] = {}
    start = 0  # the first segment to run from the stored states
    states = _TileStates(inputs, spill)
    try:
        for k in range(len(segments)):
            last = k == len(segments) - 1
            store = not last and not (spill and pending[k])
            tile_stats: dict[int, tuple[mx.array, mx.array, int]] = {}
            for i in mine:
                h, res = states.get(i)
                for j in range(start, k + 1):
                    h, res = _run(segments[j], h, res, shared[j - 1] if j else None)
                if last:
                    crops[i] = _crop(h, tiles[i], is_decoder)
                    mx.eval(crops[i])
                    continue
                mean, var = group_statistics(h, GROUPS)
                tile_stats[i] = (mean, var, h.shape[1] * h.shape[2])
                if store:
                    mx.eval(h, res, mean, var)
                    states.put(i, h, res)
                else:
                    mx.eval(mean, var)
            if not last:
                means, variances, pixels = _every_tile(tile_stats, len(tiles), group)
                weights = pixels / pixels.max()
                weights = (weights / weights.sum())[:, None, None]
                shared.append((mx.sum(means * weights, axis=0), mx.sum(variances * weights, axis=0)))
                mx.eval(*shared[-1])
            if store:
                states.commit()
                start = k + 1
    finally:
        states.close()
    if group is not None:  # zeros where another rank's crops go; the all_sum fills them in exactly
        some = next(iter(crops.values()))
        for i, t in enumerate(tiles):
            if i not in crops:
                crops[i] = mx.zeros((some.shape[0], t.dst[3] - t.dst[2], t.dst[1] - t.dst[0], some.shape[3]), some.dtype)
    ordered = [crops[i] for i in range(len(tiles))]
    rows = [mx.concatenate(ordered[r : r + cols], axis=2) for r in range(0, len(ordered), cols)]
    out = mx.concatenate(rows, axis=1)
    return out if group is None else all_sum(out, group)


def _every_tile(stats: dict[int, tuple[mx.array, mx.array, int]], n: int, group) -> tuple[mx.array, mx.array, mx.array]:
    """Every tile's group means, variances [n, B, groups] and pixel counts [n] (float32), in tile order; with a
    group, gathered from the ranks that computed them (an all_sum in which each tile is non-zero on one rank)."""
    if group is None:
        return (mx.stack([stats[i][0] for i in range(n)]), mx.stack([stats[i][1] for i in range(n)]),
                mx.array([stats[i][2] for i in range(n)], dtype=mx.float32))
    some = next(iter(stats.values()))[0]
    zero = mx.zeros_like(some)
    packed = mx.stack([mx.stack([stats[i][0], stats[i][1]]) if i in stats else mx.stack([zero, zero]) for i in range(n)])
    pixels = mx.array([stats[i][2] if i in stats else 0 for i in range(n)], dtype=mx.float32)
    # pixel counts are integers far below 2**24: exact in float32, like every x + 0
    packed, pixels = all_sum(packed, group), all_sum(pixels, group)
    return packed[:, 0], packed[:, 1], pixels


def _image(vae: AutoencoderKL, x: mx.array) -> mx.array:
    if x.ndim != 4 or x.shape[-1] != vae.cfg.in_channels:
        raise ValueError(f"image must be NHWC with {vae.cfg.in_channels} channels, got shape {tuple(x.shape)}")
    return x.astype(vae.dtype)


def _spill(vae: AutoencoderKL, height: int, width: int, tile_size: int, is_decoder: bool, budget_bytes: int | None) -> bool:
    """Spill when the in-RAM estimate exceeds the budget: the rule `plan_tiles` plans with (None: never)."""
    dtype_size = vae.dtype.size
    return budget_bytes is not None and estimate_bytes(vae.cfg, height, width, tile_size, is_decoder, dtype_size) > budget_bytes


def tiled_encoder_features(
    vae: AutoencoderKL, x: mx.array, tile_size: int, denoise: bool = False, budget_bytes: int | None = None, group=None
) -> mx.array:
    """Raw output of the (denoise) encoder, tiled: [B, H/8, W/8, 2*z_channels]. `group`: see `tiled_forward`."""
    net = vae.denoise_encoder if denoise else vae.encoder
    x = _image(vae, x)
    spill = _spill(vae, x.shape[1], x.shape[2], tile_size, False, budget_bytes)
    return tiled_forward(net, x, tile_size, spill, group)


def tiled_encode_moments(vae: AutoencoderKL, x: mx.array, tile_size: int, budget_bytes: int | None = None,
                         group=None) -> mx.array:
    """`vae.encode_moments` with the plain encoder tiled."""
    return vae.moments_from_features(tiled_encoder_features(vae, x, tile_size, budget_bytes=budget_bytes, group=group))


def tiled_encode(
    vae: AutoencoderKL, x: mx.array, tile_size: int, noise: mx.array | None = None, budget_bytes: int | None = None,
    group=None,
) -> mx.array:
    """`vae.encode` (official encode_first_stage under init_tile_vae)."""
    return vae.latent_from_moments(tiled_encode_moments(vae, x, tile_size, budget_bytes, group), noise)


def tiled_encode_with_denoise(vae: AutoencoderKL, x: mx.array, tile_size: int, budget_bytes: int | None = None,
                              group=None) -> mx.array:
    """`vae.encode_with_denoise` with the denoise encoder tiled."""
    h = tiled_encoder_features(vae, x, tile_size, denoise=True, budget_bytes=budget_bytes, group=group)
    return vae.latent_from_moments(vae.moments_from_features(h))


def tiled_decode(vae: AutoencoderKL, z: mx.array, tile_size: int, budget_bytes: int | None = None,
                 group=None) -> mx.array:
    """`vae.decode` with the decoder tiled; `tile_size` is in latent pixels. With a `budget_bytes` the tile
    states spill to disk when they would not fit in it."""
    f = vae.cfg.downsample_factor
    spill = _spill(vae, z.shape[1] * f, z.shape[2] * f, tile_size, True, budget_bytes)
    return tiled_forward(vae.decoder, vae.decoder_input(z), tile_size, spill, group).astype(mx.float32)


# --- choosing tile sizes -------------------------------------------------------------------------
# Peak memory model (bytes):
#   held    = in RAM: the state every tile keeps at the widest GroupNorm barrier, summed over the padded
#             tiles (so the overlap counts); spilled: SPILL_COPIES states of one tile (read into a numpy
#             buffer, then MLX, the recomputed barrier, the state written). Measured by
#             bench/bench_restore_memory.py (full-size VAE, CPU, fp32): encoder 6 (2048 px, tile 512: 4.94 GB
#             measured, 4.86 estimated); decoder 3 (1024 px tile 32: 3.63 GB, 2048 px tile 48: 6.11 GB, both
#             within 2%; with 6 they were overestimated by 17-18%);
#   working = what one tile (or the untiled pass) needs while it runs: COPIES full-resolution activations of
#             the widest channel count, plus the attention scores of the mid block (queries are chunked to
#             MAX_SCORE_ELEMENTS).
# COPIES by (tiled, is_decoder): the largest value MLX allocator peaks of the full-size VAE imply, plus 0.15-0.3
# to the quarter (`bench_restore_memory.py --calibrate vae`: CPU backend, fp32, Dec 2026, after the host GroupNorm,
# SiLU and attention went in place): encoder untiled 5.03 at 512 and 1024 px; tiled 6.05 / 6.08 / 6.46 (1024 /
# 1536 px at tile 512, 1024 px at tile 384); decoder untiled 3.75 / 3.74 (512 / 1024 px); tiled 2.04 / 2.03 / 2.34
# (1024 / 1536 px at tile 64, 1024 px at tile 32). (Fitted before those changes: 8, 6, 8, 4; before the 3x3
# convolutions stopped unfolding their input: 16 tiled, 48 untiled. SPILL_COPIES have not been re-measured since:
# they err on the safe side.) Smaller tiles shrink `working` but grow `held` (more overlap), so the largest tile
# that fits is the best one. Re-measure on Metal.
COPIES = {(False, False): 5.25, (False, True): 4.0, (True, False): 6.75, (True, True): 2.5}
SPILL_COPIES = {False: 6, True: 3}  # by is_decoder
ENCODER_TILES = (2048, 1536, 1024, 768, 512, 384, 256, 192, 128)  # image pixels
DECODER_TILES = (256, 192, 160, 128, 96, 64, 48, 32, 24, 16)  # latent pixels


@dataclass(frozen=True)
class TilePlan:
    """Tile sizes for `tiled_encode*` (image pixels) and `tiled_decode` (latent pixels), with the
    estimated peak bytes of each; a tile size >= the image side means the pass runs untiled. `*_spill`:
    the pass keeps its tile states on disk, needing at most `disk_bytes` of scratch space."""

    encoder_tile: int
    decoder_tile: int
    encoder_bytes: int
    decoder_bytes: int
    fits: bool
    encoder_spill: bool = False
    decoder_spill: bool = False
    disk_bytes: int = 0


def _barriers(cfg, is_decoder: bool) -> list[tuple[int, int, bool]]:
    """(channels held, area divisor from full resolution, residual pending) at each barrier, in the order
    `_segments(network_ops(net))` meets them: norm1 of a ResNet block holds its input, norm2 holds conv1's
    output plus the residual branch."""
    ch, n, top = cfg.ch, len(cfg.ch_mult), cfg.ch * cfg.ch_mult[-1]

    def block(cin: int, cout: int, div: int) -> list[tuple[int, int, bool]]:
        return [(cin, div, False), (2 * cout, div, True)]

    def mid(div: int) -> list[tuple[int, int, bool]]:
        return block(top, top, div) + [(top, div, False)] + block(top, top, div)

    out, cin = [], top if is_decoder else ch
    if is_decoder:
        div = 4 ** (n - 1)
        out += mid(div)
        for i in reversed(range(n)):
            for _ in range(cfg.num_res_blocks + 1):
                out += block(cin, ch * cfg.ch_mult[i], div)
                cin = ch * cfg.ch_mult[i]
            div //= 4 if i else 1
        return out + [(cin, div, False)]
    div = 1
    for i in range(n):
        for _ in range(cfg.num_res_blocks):
            out += block(cin, ch * cfg.ch_mult[i], div)
            cin = ch * cfg.ch_mult[i]
        div *= 4 if i < n - 1 else 1
    return out + mid(div) + [(top, div, False)]


def _padded_areas(cfg, height: int, width: int, tile_size: int, is_decoder: bool) -> list[int]:
    """Full-resolution pixels of each padded tile; empty when the pass runs untiled."""
    f = cfg.downsample_factor
    size = (height // f, width // f) if is_decoder else (height, width)
    if not needs_tiling(*size, tile_size, is_decoder):
        return []
    scale = f * f if is_decoder else 1
    return [(t.src[1] - t.src[0]) * (t.src[3] - t.src[2]) * scale for t in split_tiles(*size, tile_size, is_decoder)[0]]


def copy_bytes(cfg, height: int, width: int, tile_size: int, is_decoder: bool, dtype_size: int) -> int:
    """Bytes of one of COPIES: a full-resolution activation of the widest channel count over the largest padded
    tile (the whole image when the pass runs untiled)."""
    areas = _padded_areas(cfg, height, width, tile_size, is_decoder)
    return _copy_bytes(cfg, max(areas) if areas else height * width, is_decoder, dtype_size)


def _copy_bytes(cfg, tile_px: int, is_decoder: bool, dtype_size: int) -> int:
    c0 = cfg.ch * cfg.ch_mult[0]
    widest = (cfg.ch * cfg.ch_mult[1] if len(cfg.ch_mult) > 1 else c0) if is_decoder else c0
    return widest * tile_px * dtype_size


def estimate_bytes(
    cfg, height: int, width: int, tile_size: int, is_decoder: bool, dtype_size: int, spill: bool = False
) -> int:
    """Estimated peak bytes of one tiled (or untiled) VAE pass over a height x width image."""
    from ..models.layers import MAX_SCORE_ELEMENTS

    f = cfg.downsample_factor
    areas = _padded_areas(cfg, height, width, tile_size, is_decoder)
    if areas:
        state = max(c / div for c, div, _ in _barriers(cfg, is_decoder)) * dtype_size  # bytes per full-res pixel
        tile_px = max(areas)
        held = int(state * (SPILL_COPIES[is_decoder] * tile_px if spill else sum(areas)))
    else:
        held, tile_px = 0, height * width
    tokens = tile_px // (f * f)
    scores = min(tokens * tokens, max(MAX_SCORE_ELEMENTS, tokens)) * 4
    working = COPIES[bool(areas), is_decoder] * _copy_bytes(cfg, tile_px, is_decoder, dtype_size) + scores
    output = height * width * 3 * 4 if is_decoder else tokens * 2 * cfg.z_channels * 4
    return int(held + working + output)


def spill_traffic(cfg, height: int, width: int, tile_size: int, is_decoder: bool, dtype_size: int) -> tuple[int, int, int]:
    """(peak scratch-disk bytes, bytes written, bytes read) of one spilled pass; zeros when it runs untiled.

    Every barrier without a pending residual is written once; each segment reads the last stored barrier
    (the input tiles, before the first, come from RAM); the file being read and the one being written
    coexist.
    """
    total = sum(_padded_areas(cfg, height, width, tile_size, is_decoder))
    if not total:
        return 0, 0, 0
    barriers = _barriers(cfg, is_decoder)
    sizes = [None if pending else c * total // div * dtype_size for c, div, pending in barriers]
    stored = [s for s in sizes if s is not None]
    disk = max(a + b for a, b in zip(stored, stored[1:] + [0]))
    read, last = 0, 0
    for s in sizes:  # the segment after each barrier reads the last stored one
        last = s if s is not None else last
        read += last
    return disk, sum(stored), read


def plan_tiles(cfg, height: int, width: int, budget_bytes: int, dtype_size: int = 4) -> TilePlan:
    """Largest encoder and decoder tiles whose estimated peak fits `budget_bytes` for this image.

    Untiled is chosen when it fits (it is exact and fastest); a tiled pass keeps its states in RAM when
    they fit, else spills them to disk (what `tiled_*(budget_bytes=...)` then do by the same estimate).
    When even the smallest spilled tile does not fit, the smallest tiles are returned with `fits=False`,
    so a memory plan can refuse the job before any work starts.
    """
    if height < 1 or width < 1 or budget_bytes <= 0:
        raise ValueError(f"need a positive image size and budget, got {height}x{width}, {budget_bytes} bytes")
    side = max(height, width)
    f = cfg.downsample_factor

    def pick(candidates: tuple[int, ...], untiled: int, is_decoder: bool) -> tuple[int, int, bool, bool]:
        for tile in (untiled,) + tuple(t for t in candidates if t < untiled):
            for spill in (False, True):
                need = estimate_bytes(cfg, height, width, tile, is_decoder, dtype_size, spill)
                if need <= budget_bytes:
                    return tile, need, spill, True
        return tile, need, spill, False

    enc, enc_bytes, enc_spill, enc_fits = pick(ENCODER_TILES, side, False)
    dec, dec_bytes, dec_spill, dec_fits = pick(DECODER_TILES, -(-side // f), True)
    disk = max(
        spill_traffic(cfg, height, width, tile, is_decoder, dtype_size)[0] if spill else 0
        for tile, is_decoder, spill in ((enc, False, enc_spill), (dec, True, dec_spill))
    )
    return TilePlan(enc, dec, enc_bytes, dec_bytes, enc_fits and dec_fits, enc_spill, dec_spill, disk)
