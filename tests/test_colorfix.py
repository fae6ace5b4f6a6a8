import mlx.core as mx
import numpy as np
import pytest

from supir_mlx.conformance import run
from supir_mlx.pipeline import colorfix
from supir_mlx.pipeline.colorfix import adain_color_fix, wavelet_blur, wavelet_color_fix, wavelet_decomposition


def test_colorfix_conformance(reference_dir):
    results = list(run(reference_dir, ["colorfix/"]))
    assert len(results) == 2
    for r in results:
        assert r.status == "PASS", r.line()


@pytest.mark.parametrize("band", [7, 16, 33])
def test_colorfix_in_bands_still_matches_the_official(reference_dir, monkeypatch, band):
    # Bands narrower than the reference images, some thinner than the blurs' reach (HALO): every cut is exact.
    monkeypatch.setattr(colorfix, "BAND_ROWS", band)
    results = list(run(reference_dir, ["colorfix/"]))
    assert results and all(r.status == "PASS" for r in results), [r.line() for r in results]


def test_bands_are_bit_identical_to_the_whole_image(monkeypatch):
    content, style = _images((2, 150, 37, 3))
    whole = np.array(wavelet_color_fix(content, style))
    monkeypatch.setattr(colorfix, "BAND_ROWS", 40)
    assert np.array_equal(np.array(wavelet_color_fix(content, style)), whole)


def _images(shape=(2, 40, 56, 3)):
    rng = np.random.default_rng(0)
    return mx.array(rng.standard_normal(shape).astype(np.float32)), mx.array(
        (0.3 * rng.standard_normal(shape) + 0.5).astype(np.float32)
    )


def test_blur_keeps_constants_at_the_border():
    # replicate padding: zero padding would darken the border by up to a quarter per level
    x = mx.full((1, 20, 24, 3), 0.7)
    for radius in (1, 2, 4, 8, 16):
        assert np.allclose(np.array(wavelet_blur(x, radius)), 0.7, atol=1e-6)


def test_wavelet_moves_coarse_colour_only():
    # the low band is linear and keeps constants, so a colour cast of the style carries over exactly
    content, _ = _images()
    shift = mx.array([0.1, -0.2, 0.3])
    out = wavelet_color_fix(content, content + shift)
    assert np.allclose(np.array(out), np.array(content + shift), atol=1e-5)
    high, low = wavelet_decomposition(content)
    assert np.allclose(np.array(high + low), np.array(content), atol=1e-5)


def test_adain_takes_style_statistics():
    content, style = _images()
    out = np.array(adain_color_fix(content, style))
    c, s = np.array(content), np.array(style)
    assert np.allclose(out.mean(axis=(1, 2)), s.mean(axis=(1, 2)), atol=1e-5)
    # unbiased variances, 1e-5 added to both before the square root
    vc, vs = c.var(axis=(1, 2), ddof=1), s.var(axis=(1, 2), ddof=1)
    assert np.allclose(out.var(axis=(1, 2), ddof=1), vc / (vc + 1e-5) * (vs + 1e-5), rtol=1e-4)


def test_bad_shapes():
    content, style = _images()
    with pytest.raises(ValueError, match="equal shapes"):
        wavelet_color_fix(content, style[:, :32])
    with pytest.raises(ValueError, match="NHWC"):
        adain_color_fix(content[0], style[0])
