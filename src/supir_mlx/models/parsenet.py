"""ParseNet, the face parser of the official paste-back (facexlib `parsing_parsenet.pth`), NHWC.

Named like facexlib's ParseNet (`encoder.1.conv1.conv2d`, `body.3.conv2.norm.norm`, `out_mask_conv.conv2d`, ...)
so the checkpoint maps one-to-one; its constructor arguments are the config. Convolutions pad by reflection,
normalise with BatchNorm (running statistics) and activate with LeakyReLU(0.2), as facexlib's
`norm_type='bn', relu_type='LeakyReLU'` defaults that both the real and the reduced model use.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import log2

import mlx.core as mx
import mlx.nn as nn

from .layers import Conv2d, conv2d

LEAKY_SLOPE = 0.2


@dataclass(frozen=True)
class ParseNetConfig:
    """facexlib ParseNet arguments; the defaults are the real model's (init_parsing_model('parsenet'))."""

    in_size: int = 512
    out_size: int = 512
    min_feat_size: int = 32
    base_ch: int = 64
    parsing_ch: int = 19
    res_depth: int = 10
    ch_range: tuple[int, int] = (32, 256)
    eps: float = 1e-5

    @classmethod
    def from_dict(cls, d: dict) -> "ParseNetConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "ch_range" in known:
            known["ch_range"] = tuple(known["ch_range"])
        return cls(**known)

    def clip(self, ch: int) -> int:
        return max(self.ch_range[0], min(ch, self.ch_range[1]))


class NormLayer(nn.Module):
    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.norm = nn.BatchNorm(channels, eps=eps)

    def __call__(self, x: mx.array) -> mx.array:
        return self.norm(x)


class ConvLayer(nn.Module):
    """Optional nearest x2 ('up'), reflection pad, conv (stride 2 for 'down'), optional BN, optional LeakyReLU."""

    def __init__(self, cin: int, cout: int, scale: str = "none", norm: bool = False, act: bool = False, eps: float = 1e-5):
        super().__init__()
        self.up, self.act = scale == "up", act
        self.conv2d = Conv2d(cin, cout, 3, stride=2 if scale == "down" else 1, padding=1, bias=not norm)
        if norm:
            self.norm = NormLayer(cout, eps)

    def __call__(self, x: mx.array) -> mx.array:
        if self.up:
            x = mx.repeat(mx.repeat(x, 2, axis=1), 2, axis=2)
        c = self.conv2d
        x = conv2d(x, c.weight, c.get("bias"), c.stride, c.padding, reflect=True)
        if "norm" in self:
            x = self.norm(x)
        return nn.leaky_relu(x, LEAKY_SLOPE) if self.act else x


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, scale: str, eps: float):
        super().__init__()
        if scale != "none" or cin != cout:
            self.shortcut_func = ConvLayer(cin, cout, scale)
        first, second = {"down": ("none", "down"), "up": ("up", "none"), "none": ("none", "none")}[scale]
        self.conv1 = ConvLayer(cin, cout, first, norm=True, act=True, eps=eps)
        self.conv2 = ConvLayer(cout, cout, second, norm=True, eps=eps)

    def __call__(self, x: mx.array) -> mx.array:
        identity = self.shortcut_func(x) if "shortcut_func" in self else x
        return identity + self.conv2(self.conv1(x))


class ParseNet(nn.Module):
    def __init__(self, cfg: ParseNetConfig = ParseNetConfig()):
        super().__init__()
        self.cfg = cfg
        c, eps = cfg.clip, cfg.eps
        min_feat = min(cfg.in_size, cfg.min_feat_size)
        head = cfg.base_ch
        self.encoder: list[nn.Module] = [ConvLayer(3, head)]
        for _ in range(int(log2(cfg.in_size // min_feat))):
            self.encoder.append(ResidualBlock(c(head), c(head * 2), "down", eps))
            head *= 2
        self.body = [ResidualBlock(c(head), c(head), "none", eps) for _ in range(cfg.res_depth)]
        self.decoder = []
        for _ in range(int(log2(cfg.out_size // min_feat))):
            self.decoder.append(ResidualBlock(c(head), c(head // 2), "up", eps))
            head //= 2
        self.out_img_conv = ConvLayer(c(head), 3)
        self.out_mask_conv = ConvLayer(c(head), cfg.parsing_ch)

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """x: [B, S, S, 3] RGB normalised to [-1, 1] -> (mask logits [B, S, S, parsing_ch], image [B, S, S, 3])."""
        for layer in self.encoder:
            x = layer(x)
        feat = x
        for layer in self.body:
            x = layer(x)
        x = feat + x
        for layer in self.decoder:
            x = layer(x)
        return self.out_mask_conv(x), self.out_img_conv(x)
