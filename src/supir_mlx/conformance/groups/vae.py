"""Group `vae`: encoder moments, denoise-encoder latent, decoder, and the sampled encode with the fixture's draw."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .. import Comparison, Context, Fixture, compare


def to_nhwc(a: np.ndarray) -> mx.array:
    return mx.array(np.ascontiguousarray(a.transpose(0, 2, 3, 1)))


def to_nchw(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).transpose(0, 3, 1, 2)


def vae(ctx: Context):
    """The tiny first_stage_model, fp32."""
    from ...models.vae import AutoencoderKL

    return ctx.component("vae", lambda: AutoencoderKL(ctx.config().vae), "first_stage_model.")


def run(fixture: Fixture, ctx: Context) -> list[Comparison]:
    model = vae(ctx)
    rtol = ctx.rtol("vae")
    x = to_nhwc(fixture["x"])
    moments = model.encode_moments(x)
    moments_denoise = model.denoise_moments(x)
    z_denoise = model.latent_from_moments(moments_denoise)
    # decode the reference latent so the decoder is checked on its own input
    decoded = model.decode(to_nhwc(fixture["z_denoise_scaled"]))
    sampled = model.latent_from_moments(moments, to_nhwc(fixture["sample_noise"]))
    embed = moments.shape[-1] // 2
    return [
        compare("moments", to_nchw(moments), fixture["moments"], rtol),
        compare("mode", to_nchw(moments[..., :embed]), fixture["mode"], rtol),
        compare("moments_denoise", to_nchw(moments_denoise), fixture["moments_denoise"], rtol),
        compare("z_denoise_scaled", to_nchw(z_denoise), fixture["z_denoise_scaled"], rtol),
        compare("decoded", to_nchw(decoded), fixture["decoded"], rtol),
        compare("z_encode_sampled_scaled", to_nchw(sampled), fixture["z_encode_sampled_scaled"], rtol),
    ]
