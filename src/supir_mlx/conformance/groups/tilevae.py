"""Group `tilevae`: the official tiled VAE (VAEHook) against its own outputs, tile boxes included."""

from __future__ import annotations

import numpy as np

from .. import Comparison, Context, Fixture, compare, compare_exact
from .vae import to_nchw, to_nhwc, vae


def run(fixture: Fixture, ctx: Context) -> list[Comparison]:
    from ...pipeline.tiled_vae import split_tiles, tiled_decode, tiled_encode_with_denoise, tiled_encoder_features

    model = vae(ctx)
    rtol = ctx.rtol("tilevae")
    enc_tile, dec_tile = int(fixture.param("encoder_tile")), int(fixture.param("decoder_tile"))
    x, z = to_nhwc(fixture["x"]), to_nhwc(fixture["z"])
    out = []
    for name, size, tile, is_decoder in (
        ("encoder", x.shape[1:3], enc_tile, False),
        ("decoder", z.shape[1:3], dec_tile, True),
    ):
        tiles, _ = split_tiles(*size, tile, is_decoder)
        out.append(compare_exact(f"{name}_tile_in_bboxes", np.array([t.src for t in tiles]), fixture[f"{name}_tile_in_bboxes"]))
        out.append(compare_exact(f"{name}_tile_out_bboxes", np.array([t.dst for t in tiles]), fixture[f"{name}_tile_out_bboxes"]))
    pairs = {
        "z_denoise": (tiled_encode_with_denoise(model, x, enc_tile), model.encode_with_denoise(x)),
        "encoder_h": (tiled_encoder_features(model, x, enc_tile), model.encoder(x)),
        "decode": (tiled_decode(model, z, dec_tile), model.decode(z)),
    }
    for name, (tiled, untiled) in pairs.items():
        out.append(compare(f"tiled_{name}", to_nchw(tiled), fixture[f"tiled_{name}"], rtol))
        out.append(compare(f"untiled_{name}", to_nchw(untiled), fixture[f"untiled_{name}"], rtol))
    return out
