"""A cheap live preview: the sampler's latent projected to RGB by one linear map, no VAE decode.

The map (latent channels + 1 -> RGB) is fitted once per loaded model by least squares between the denoising
encoder's latent of a synthetic colour field and that field averaged over each latent pixel, so it follows
whatever VAE the weights carry (SDXL's, a fine-tune's, or the tests' random one) instead of constants that hold
for one VAE only.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

FIT_SIZE = 128  # image pixels of the fitting field: one small encoder pass at load time


def fit_projection(runner, size: int = FIT_SIZE, seed: int = 0) -> np.ndarray:
    """(C + 1) x 3 least-squares map from a latent pixel (and a constant) to its mean RGB in [-1, 1]."""
    import mlx.core as mx

    from ..pipeline.supir import VAETiles

    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (6, 6, 3)).astype(np.uint8)  # smooth patches of many colours
    field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32) / 127.5 - 1
    z = np.array(runner.encode_with_denoise(mx.array(field[None]), VAETiles()))[0]
    h, w, c = z.shape
    target = field.reshape(h, size // h, w, size // w, 3).mean((1, 3)).reshape(-1, 3)
    a = np.concatenate([z.reshape(-1, c), np.ones((h * w, 1), np.float32)], 1)
    return np.linalg.lstsq(a, target, rcond=None)[0].astype(np.float32)


def project(latent, weights: np.ndarray) -> Image.Image:
    """The first image of an NHWC latent batch as an RGB picture at latent resolution."""
    z = np.array(latent[0], dtype=np.float32)
    rgb = z @ weights[:-1] + weights[-1]
    return Image.fromarray(((np.clip(rgb, -1, 1) + 1) * 127.5 + 0.5).astype(np.uint8))
