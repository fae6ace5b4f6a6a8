"""The fidelity map on constructed cases: what an honest upscale gives, and where replaced content lights up."""

import numpy as np
import pytest
from PIL import Image

from supir_mlx.pipeline.fidelity import STRONG, fidelity_map
from supir_mlx.pipeline.preprocess import resize_bicubic_torch


def photo_like(h, w, seed, octaves=(16, 8, 4, 2)):
    """A smooth random field over a few scales (a 1/f-ish spectrum like a photo's), a disc and an edge."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.float32)
    for o in octaves:
        n = rng.standard_normal((h // o + 2, w // o + 2, 3)).astype(np.float32)
        img += resize_bicubic_torch(n, (h // o + 2) * o, (w // o + 2) * o)[o:o + h, o:o + w] * (o / 16) * 0.12
    yy, xx = np.mgrid[0:h, 0:w]
    img += ((xx - w * 0.3) ** 2 + (yy - h * 0.6) ** 2 < (h * 0.15) ** 2)[..., None] * np.float32([0.25, -0.1, 0.05])
    img += (xx > w * 0.7)[..., None] * np.float32(0.15)
    return np.clip(img + 0.5, 0, 1)


def upscale(x, s, how):
    h, w = x.shape[:2]
    if how == "torch-bicubic":
        return np.clip(resize_bicubic_torch(x, h * s, w * s), 0, 1)
    u8 = Image.fromarray((x * 255 + 0.5).astype(np.uint8))
    return np.asarray(u8.resize((w * s, h * s), {"lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR}[how]))


SRC = photo_like(96, 128, 0)


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("how", ["torch-bicubic", "lanczos", "bilinear"])
def test_a_smooth_upscale_gives_an_almost_empty_map(scale, how):
    out = upscale(SRC, scale, how)
    fm = fidelity_map(SRC, out)
    assert fm.score.shape == out.shape[:2]
    s = fm.summary()
    assert s["strong_share"] == 0 and s["moderate_share"] == 0, s
    assert s["mean_score"] < 0.03 and np.quantile(fm.score, 0.99) < 0.1, s


def test_restoring_noise_or_a_global_colour_shift_is_not_strong_invention():
    clean_up = upscale(SRC, 2, "torch-bicubic")
    noisy = np.clip(SRC + np.random.default_rng(5).normal(0, 0.03, SRC.shape), 0, 1)
    s = fidelity_map(noisy, clean_up).summary()
    assert s["strong_share"] < 0.001 and s["moderate_share"] < 0.1, s
    s = fidelity_map(SRC, np.clip(clean_up * 0.9 + 0.06, 0, 1)).summary()
    assert s["strong_share"] == 0 and s["moderate_share"] == 0, s


def _replaced(scale, content):
    out = upscale(SRC, scale, "torch-bicubic").copy()
    H, W = out.shape[:2]
    y0, y1, x0, x1 = H // 4, H // 4 + H // 3, W // 2, W // 2 + W // 3
    out[y0:y1, x0:x1] = content(H, W)[y0:y1, x0:x1]
    inside = np.zeros((H, W), bool)
    inside[y0:y1, x0:x1] = True
    m = 4 * scale  # the measurements' reach: a few input pixels around the region
    near = np.zeros((H, W), bool)
    near[y0 - m:y1 + m, x0 - m:x1 + m] = True
    return fidelity_map(SRC, out), inside, ~near


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("kind", ["other photo", "flat colour"])
def test_a_replaced_region_lights_up_there_and_only_there(scale, kind):
    content = {"other photo": lambda H, W: photo_like(H, W, 9, octaves=(8, 4, 2, 1)),
               "flat colour": lambda H, W: np.broadcast_to(np.float32([0.2, 0.6, 0.3]), (H, W, 3))}[kind]
    fm, inside, outside = _replaced(scale, content)
    assert (fm.score[inside] >= STRONG).mean() > 0.95
    assert fm.score[outside].max() < 0.1 and fm.score[outside].mean() < 0.02
    assert abs(fm.summary()["strong_share"] - inside.mean()) < 0.03  # the share of strong invention is the region


def test_fine_detail_added_on_top_of_the_input_is_synthesis_not_drift():
    fm, inside, outside = _replaced(2, lambda H, W: np.clip(upscale(SRC, 2, "torch-bicubic") + np.random.default_rng(3)
                                                            .normal(0, 0.06, (H, W, 3)), 0, 1))
    assert (fm.score[inside] >= STRONG).mean() > 0.7
    assert fm.synthesis[inside].mean() > 0.03 and fm.drift[inside].mean() < 0.01
    assert fm.score[outside].max() < 0.1


def test_render_is_grey_where_faithful_and_hot_where_invented():
    fm, inside, outside = _replaced(2, lambda H, W: np.broadcast_to(np.float32([0.2, 0.6, 0.3]), (H, W, 3)))
    img = fm.render(upscale(SRC, 2, "torch-bicubic"))
    assert img.dtype == np.uint8 and img.shape == (*fm.score.shape, 3)
    calm = img[outside & (fm.score < 0.01)].astype(int)
    assert np.abs(calm[:, 0] - calm[:, 2]).max() <= 2 and calm.max() <= 0.35 * 255 + 1  # dim grey
    hot = img[inside & (fm.score >= 0.99)].astype(int)
    assert (hot >= 250).all()  # full score: white


def test_16bit_and_uint8_inputs_give_the_same_map():
    out = upscale(SRC, 2, "torch-bicubic")
    src8 = (SRC * 255 + 0.5).astype(np.uint8)
    a = fidelity_map(src8, out).score
    b = fidelity_map(src8.astype(np.uint16) * 257, (out * 65535 + 0.5).astype(np.uint16)).score
    assert np.abs(a - b).max() < 1e-3
