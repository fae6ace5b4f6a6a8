"""Group `colorfix`: wavelet reconstruction and AdaIN against the official functions."""

from __future__ import annotations

from .. import Comparison, Context, Fixture, compare
from .vae import to_nchw, to_nhwc


def run(fixture: Fixture, ctx: Context) -> list[Comparison]:
    from ...pipeline.colorfix import adain_color_fix, wavelet_color_fix

    rtol = ctx.rtol("colorfix")
    content, style = to_nhwc(fixture["content"]), to_nhwc(fixture["style"])
    return [
        compare("wavelet", to_nchw(wavelet_color_fix(content, style)), fixture["wavelet"], rtol),
        compare("adain", to_nchw(adain_color_fix(content, style)), fixture["adain"], rtol),
    ]
