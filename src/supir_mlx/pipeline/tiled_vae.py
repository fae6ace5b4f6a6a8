"""The official tiled VAE (SUPIR/utils/tilevae.py `VAEHook`, as `SUPIRModel.init_tile_vae` installs it).

The image (or latent) is cut into tiles padded by 32 pixels (encoder) or 11 latent pixels (decoder),
and the network runs as a flat list of operations over all tiles in lock-step. Every GroupNorm is a
barrier: each tile stops there, and once all tiles have arrived, the norm is applied to every tile
with statistics shared across tiles: the pixel-count-weighted means of the per-tile group means and
(biased) variances — not a pooled variance. The mid-block attention sees one tile at a time. The
valid centre of each finished tile is cropped and the crops are stitched. The result therefore
differs from the untiled network, and reproduces the official numbers (fast mode and colour-fix
mode of VAEHook are off in SUPIR and are not implemented).

Memory: between two norms, each tile's activation (and its pending residual) must be kept, so the
held state is about the full-image activation plus the overlap of the padded tiles; everything else
(one tile's working set, the attention scores) scales with the tile. Each tile's state is evaluated
at every barrier so no lazy graph keeps earlier activations alive, and finished tiles are cropped at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

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
# h = h + residual; ("norm", gn) the GroupNorm barrier.
Op = tuple[str, Callable | nn.GroupNorm | None]


def _resblock_ops(block: ResnetBlock) -> list[Op]:
    return [
        ("res", block.shortcut),
        ("norm", block.norm1),
        ("apply", nn.silu),
        ("apply", block.conv1),
        ("norm", block.norm2),
        ("apply", nn.silu),
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
    return ops + [("norm", net.norm_out), ("apply", nn.silu), ("apply", net.conv_out)]


def _group_stats(h: mx.array) -> tuple[mx.array, mx.array]:
    """Per (batch item, group) mean and biased variance, in float32."""
    b, hh, ww, c = h.shape
    g = h.astype(mx.float32).reshape(b, hh * ww, GROUPS, c // GROUPS)
    mean = mx.mean(g, axis=(1, 3))
    var = mx.mean(mx.square(g - mean[:, None, :, None]), axis=(1, 3))
    return mean, var


def _shared_norm(h: mx.array, norm: nn.GroupNorm, mean: mx.array, var: mx.array) -> mx.array:
    b, hh, ww, c = h.shape
    g = h.astype(mx.float32).reshape(b, hh, ww, GROUPS, c // GROUPS)
    g = (g - mean[:, None, None, :, None]) * mx.rsqrt(var[:, None, None, :, None] + norm.eps)
    return (g.reshape(b, hh, ww, c) * norm.weight + norm.bias).astype(h.dtype)


def _segments(ops: list[Op]) -> list[list[Op]]:
    """Cut the op list before every norm: each segment after the first starts with its norm."""
    segments: list[list[Op]] = [[]]
    for op in ops:
        if op[0] == "norm":
            segments.append([])
        segments[-1].append(op)
    return segments


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


def tiled_forward(net: Encoder | Decoder, x: mx.array, tile_size: int) -> mx.array:
    """`net(x)` the way VAEHook runs it: untiled when max(H, W) <= 2 * pad + tile_size, else tiled."""
    if not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"tile size must be a positive integer, got {tile_size!r}")
    is_decoder = isinstance(net, Decoder)
    _, height, width, _ = x.shape
    if not needs_tiling(height, width, tile_size, is_decoder):
        return net(x)
    tiles, cols = split_tiles(height, width, tile_size, is_decoder)
    states: list[tuple[mx.array, mx.array | None]] = [
        (x[:, t.src[2] : t.src[3], t.src[0] : t.src[1], :], None) for t in tiles
    ]
    segments = _segments(network_ops(net))
    shared: tuple[mx.array, mx.array] | None = None
    for k, segment in enumerate(segments):
        last = k == len(segments) - 1
        tile_stats: list[tuple[mx.array, mx.array, int]] = []
        for i, (h, res) in enumerate(states):
            for kind, f in segment:
                if kind == "norm":
                    h = _shared_norm(h, f, *shared)  # type: ignore[arg-type, misc]
                elif kind == "res":
                    res = f(h)  # type: ignore[operator]
                elif kind == "add":
                    h, res = h + res, None
                else:
                    h = f(h)  # type: ignore[operator]
            if last:
                h = _crop(h, tiles[i], is_decoder)
                mx.eval(h)
            else:
                mean, var = _group_stats(h)
                tile_stats.append((mean, var, h.shape[1] * h.shape[2]))
                mx.eval(h, res, mean, var)
            states[i] = (h, res)
        if not last:
            pixels = mx.array([p for _, _, p in tile_stats], dtype=mx.float32)
            weights = pixels / pixels.max()
            weights = (weights / weights.sum())[:, None, None]
            shared = (
                mx.sum(mx.stack([m for m, _, _ in tile_stats]) * weights, axis=0),
                mx.sum(mx.stack([v for _, v, _ in tile_stats]) * weights, axis=0),
            )
            mx.eval(*shared)
    crops = [h for h, _ in states]
    rows = [mx.concatenate(crops[r : r + cols], axis=2) for r in range(0, len(crops), cols)]
    return mx.concatenate(rows, axis=1)


def _image(vae: AutoencoderKL, x: mx.array) -> mx.array:
    if x.ndim != 4 or x.shape[-1] != vae.cfg.in_channels:
        raise ValueError(f"image must be NHWC with {vae.cfg.in_channels} channels, got shape {tuple(x.shape)}")
    return x.astype(vae.dtype)


def tiled_encoder_features(vae: AutoencoderKL, x: mx.array, tile_size: int, denoise: bool = False) -> mx.array:
    """Raw output of the (denoise) encoder, tiled: [B, H/8, W/8, 2*z_channels]."""
    net = vae.denoise_encoder if denoise else vae.encoder
    return tiled_forward(net, _image(vae, x), tile_size)


def tiled_encode_moments(vae: AutoencoderKL, x: mx.array, tile_size: int) -> mx.array:
    """`vae.encode_moments` with the plain encoder tiled."""
    return vae.moments_from_features(tiled_encoder_features(vae, x, tile_size))


def tiled_encode(vae: AutoencoderKL, x: mx.array, tile_size: int, noise: mx.array | None = None) -> mx.array:
    """`vae.encode` (official encode_first_stage under init_tile_vae)."""
    return vae.latent_from_moments(tiled_encode_moments(vae, x, tile_size), noise)


def tiled_encode_with_denoise(vae: AutoencoderKL, x: mx.array, tile_size: int) -> mx.array:
    """`vae.encode_with_denoise` with the denoise encoder tiled."""
    h = tiled_encoder_features(vae, x, tile_size, denoise=True)
    return vae.latent_from_moments(vae.moments_from_features(h))


def tiled_decode(vae: AutoencoderKL, z: mx.array, tile_size: int) -> mx.array:
    """`vae.decode` with the decoder tiled; `tile_size` is in latent pixels."""
    return tiled_forward(vae.decoder, vae.decoder_input(z), tile_size).astype(mx.float32)


# --- choosing tile sizes -------------------------------------------------------------------------
# Peak memory model (bytes), calibrated with bench/bench_tiled_vae.py on the MLX CPU backend:
#   held    = the state every tile keeps at the widest GroupNorm barrier: at full resolution, the
#             activation plus its pending residual (decoder: upsampled c1 + shortcut c0 channels;
#             encoder: c0 + c0), summed over the padded tiles (so the overlap counts);
#   working = what one tile needs while it runs, TILE_COPIES full-resolution activations of the widest
#             channel count (a 3x3 convolution unfolds its input 9x on the CPU backend), plus the
#             attention scores of the mid block (queries are chunked to MAX_SCORE_ELEMENTS).
# Untiled there is no held state, but one lazy graph over the whole image keeps far more alive than
# a tile does (UNTILED_COPIES, measured). Smaller tiles shrink `working` but grow `held` (more
# overlap), so the largest tile that fits is the best one. Re-measure both factors on Metal.
TILE_COPIES = 16
UNTILED_COPIES = 48
ENCODER_TILES = (2048, 1536, 1024, 768, 512, 384, 256, 192, 128)  # image pixels
DECODER_TILES = (256, 192, 160, 128, 96, 64, 48, 32, 24, 16)  # latent pixels


@dataclass(frozen=True)
class TilePlan:
    """Tile sizes for `tiled_encode*` (image pixels) and `tiled_decode` (latent pixels), with the
    estimated peak bytes of each; a tile size >= the image side means the pass runs untiled."""

    encoder_tile: int
    decoder_tile: int
    encoder_bytes: int
    decoder_bytes: int
    fits: bool


def estimate_bytes(cfg, height: int, width: int, tile_size: int, is_decoder: bool, dtype_size: int) -> int:
    """Estimated peak bytes of one tiled (or untiled) VAE pass over a height x width image."""
    from ..models.layers import MAX_SCORE_ELEMENTS

    c0 = cfg.ch * cfg.ch_mult[0]
    c1 = cfg.ch * cfg.ch_mult[1] if len(cfg.ch_mult) > 1 else c0
    f = cfg.downsample_factor
    size = (height // f, width // f) if is_decoder else (height, width)
    area_scale = f * f if is_decoder else 1  # input units -> full-resolution pixels
    widest = c1 if is_decoder else c0
    barrier = (c1 + c0) if is_decoder else 2 * c0
    if needs_tiling(*size, tile_size, is_decoder):
        tiles, _ = split_tiles(*size, tile_size, is_decoder)
        areas = [(t.src[1] - t.src[0]) * (t.src[3] - t.src[2]) * area_scale for t in tiles]
        held = barrier * sum(areas) * dtype_size
        tile_px = max(areas)
    else:
        held, tile_px = 0, height * width
    tokens = tile_px // (f * f)
    scores = min(tokens * tokens, max(MAX_SCORE_ELEMENTS, tokens)) * 4
    copies = TILE_COPIES if held else UNTILED_COPIES
    working = copies * widest * tile_px * dtype_size + scores
    output = height * width * 3 * 4 if is_decoder else tokens * 2 * cfg.z_channels * 4
    return held + working + output


def plan_tiles(cfg, height: int, width: int, budget_bytes: int, dtype_size: int = 4) -> TilePlan:
    """Largest encoder and decoder tiles whose estimated peak fits `budget_bytes` for this image.

    Untiled is chosen when it fits (it is exact and fastest). When even the smallest tile does not
    fit, the smallest tiles are returned with `fits=False`, so a memory plan can refuse the job
    before any work starts.
    """
    if height < 1 or width < 1 or budget_bytes <= 0:
        raise ValueError(f"need a positive image size and budget, got {height}x{width}, {budget_bytes} bytes")
    side = max(height, width)
    f = cfg.downsample_factor

    def pick(candidates: tuple[int, ...], untiled: int, is_decoder: bool) -> tuple[int, int, bool]:
        for tile in (untiled,) + tuple(t for t in candidates if t < untiled):
            need = estimate_bytes(cfg, height, width, tile, is_decoder, dtype_size)
            if need <= budget_bytes:
                return tile, need, True
        return tile, need, False

    enc, enc_bytes, enc_fits = pick(ENCODER_TILES, side, False)
    dec, dec_bytes, dec_fits = pick(DECODER_TILES, -(-side // f), True)
    return TilePlan(enc, dec, enc_bytes, dec_bytes, enc_fits and dec_fits)
