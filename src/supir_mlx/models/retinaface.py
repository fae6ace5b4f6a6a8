"""RetinaFace (ResNet-50 body, FPN, SSH, class/box/landmark heads) and its detection post-processing, NHWC.

Named like facexlib's `RetinaFace('resnet50')` (`body.layer2.0.conv2`, `fpn.output1.0`, `ssh1.conv5X5_1.1`,
`ClassHead.0.conv1x1`, ...) so `detection_Resnet50_Final.pth` maps one-to-one once its 'module.' prefix is
dropped. The block counts, bottleneck width and head width are config fields, so the reduced reference model
runs through this same code. `detect_faces` is facexlib's `detect_faces(use_origin_size=True)`: the image
minus the BGR mean in the channel order given, priors, decoding, score threshold, sort and NMS, in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from math import ceil

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .layers import Conv2d


@dataclass(frozen=True)
class RetinaFaceConfig:
    layers: tuple[int, ...] = (3, 4, 6, 3)  # bottlenecks per ResNet stage (torchvision resnet50)
    width_per_group: int = 64  # bottleneck width of the first stage
    out_channel: int = 256  # FPN / SSH / head width
    eps: float = 1e-5
    min_sizes: tuple[tuple[int, ...], ...] = ((16, 32), (64, 128), (256, 512))
    steps: tuple[int, ...] = (8, 16, 32)
    variance: tuple[float, float] = (0.1, 0.2)
    mean_bgr: tuple[float, float, float] = (104.0, 117.0, 123.0)

    @classmethod
    def from_dict(cls, d: dict) -> "RetinaFaceConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("layers", "steps", "variance", "mean_bgr"):
            if k in known:
                known[k] = tuple(known[k])
        if "min_sizes" in known:
            known["min_sizes"] = tuple(tuple(m) for m in known["min_sizes"])
        return cls(**known)

    @property
    def leaky(self) -> float:
        # facexlib's FPN and SSH use LeakyReLU(0.1) only for narrow (<= 64 channel) heads, ReLU otherwise
        return 0.1 if self.out_channel <= 64 else 0.0

    @property
    def anchors(self) -> int:
        return len(self.min_sizes[0])


def conv_bn(cin: int, cout: int, k: int, stride: int, eps: float) -> list[nn.Module]:
    """facexlib's conv + BatchNorm Sequential (its activation has no parameters and is applied by the caller)."""
    return [Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm(cout, eps=eps)]


def run_conv_bn(seq: list[nn.Module], x: mx.array, slope: float | None) -> mx.array:
    """conv, BN, then LeakyReLU(slope) (ReLU at 0), or nothing when slope is None."""
    x = seq[1](seq[0](x))
    if slope is None:
        return x
    return nn.relu(x) if slope == 0 else nn.leaky_relu(x, slope)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (stride on the 3x3, expansion 4)."""

    def __init__(self, cin: int, planes: int, width: int, stride: int, eps: float):
        super().__init__()
        self.conv1 = Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm(width, eps=eps)
        self.conv2 = Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm(width, eps=eps)
        self.conv3 = Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm(planes * 4, eps=eps)
        if stride != 1 or cin != planes * 4:
            self.downsample = conv_bn(cin, planes * 4, 1, stride, eps)

    def __call__(self, x: mx.array) -> mx.array:
        h = nn.relu(self.bn1(self.conv1(x)))
        h = nn.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        identity = run_conv_bn(self.downsample, x, None) if "downsample" in self else x
        return nn.relu(h + identity)


class ResNetBody(nn.Module):
    """torchvision ResNet up to layer4 (what IntermediateLayerGetter keeps); returns layer2..4 features."""

    def __init__(self, cfg: RetinaFaceConfig):
        super().__init__()
        self.conv1 = Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm(64, eps=cfg.eps)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = 64
        for i, blocks in enumerate(cfg.layers):
            planes = 64 * 2**i
            width = planes * cfg.width_per_group // 64
            stage = []
            for b in range(blocks):
                stage.append(Bottleneck(cin, planes, width, (1 if i == 0 else 2) if b == 0 else 1, cfg.eps))
                cin = planes * 4
            setattr(self, f"layer{i + 1}", stage)

    def __call__(self, x: mx.array) -> list[mx.array]:
        x = self.maxpool(nn.relu(self.bn1(self.conv1(x))))
        feats = []
        for i in range(4):
            for block in getattr(self, f"layer{i + 1}"):
                x = block(x)
            feats.append(x)
        return feats[1:]


def resize_nearest(x: mx.array, size: tuple[int, int]) -> mx.array:
    """PyTorch's F.interpolate(mode='nearest', size=...) on NHWC: source index floor(i * in / out) in float32."""
    for axis, out in ((1, size[0]), (2, size[1])):
        n = x.shape[axis]
        if n != out:
            idx = np.minimum(np.floor(np.arange(out, dtype=np.float32) * np.float32(n / out)).astype(np.int32), n - 1)
            x = mx.take(x, mx.array(idx), axis=axis)
    return x


class FPN(nn.Module):
    def __init__(self, in_channels: list[int], out: int, eps: float, slope: float):
        super().__init__()
        self.slope = slope
        self.output1 = conv_bn(in_channels[0], out, 1, 1, eps)
        self.output2 = conv_bn(in_channels[1], out, 1, 1, eps)
        self.output3 = conv_bn(in_channels[2], out, 1, 1, eps)
        self.merge1 = conv_bn(out, out, 3, 1, eps)
        self.merge2 = conv_bn(out, out, 3, 1, eps)

    def __call__(self, feats: list[mx.array]) -> list[mx.array]:
        s = self.slope
        o1, o2, o3 = (run_conv_bn(m, f, s) for m, f in zip((self.output1, self.output2, self.output3), feats))
        o2 = run_conv_bn(self.merge2, o2 + resize_nearest(o3, o2.shape[1:3]), s)
        o1 = run_conv_bn(self.merge1, o1 + resize_nearest(o2, o1.shape[1:3]), s)
        return [o1, o2, o3]


class SSH(nn.Module):
    def __init__(self, cin: int, out: int, eps: float, slope: float):
        super().__init__()
        self.slope = slope
        self.conv3X3 = conv_bn(cin, out // 2, 3, 1, eps)
        self.conv5X5_1 = conv_bn(cin, out // 4, 3, 1, eps)
        self.conv5X5_2 = conv_bn(out // 4, out // 4, 3, 1, eps)
        self.conv7X7_2 = conv_bn(out // 4, out // 4, 3, 1, eps)
        self.conv7x7_3 = conv_bn(out // 4, out // 4, 3, 1, eps)

    def __call__(self, x: mx.array) -> mx.array:
        c3 = run_conv_bn(self.conv3X3, x, None)
        c5_1 = run_conv_bn(self.conv5X5_1, x, self.slope)
        c5 = run_conv_bn(self.conv5X5_2, c5_1, None)
        c7 = run_conv_bn(self.conv7x7_3, run_conv_bn(self.conv7X7_2, c5_1, self.slope), None)
        return nn.relu(mx.concatenate([c3, c5, c7], axis=-1))


class Head(nn.Module):
    """One level's 1x1 head: `values` numbers per anchor, flattened to [B, H*W*anchors, values]."""

    def __init__(self, cin: int, anchors: int, values: int):
        super().__init__()
        self.values = values
        self.conv1x1 = Conv2d(cin, anchors * values, 1)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv1x1(x).reshape(x.shape[0], -1, self.values)


class RetinaFace(nn.Module):
    def __init__(self, cfg: RetinaFaceConfig = RetinaFaceConfig()):
        super().__init__()
        self.cfg = cfg
        self.body = ResNetBody(cfg)
        oc, eps, slope = cfg.out_channel, cfg.eps, cfg.leaky
        self.fpn = FPN([512, 1024, 2048], oc, eps, slope)
        self.ssh1, self.ssh2, self.ssh3 = (SSH(oc, oc, eps, slope) for _ in range(3))
        levels = range(len(cfg.steps))
        self.ClassHead = [Head(oc, cfg.anchors, 2) for _ in levels]
        self.BboxHead = [Head(oc, cfg.anchors, 4) for _ in levels]
        self.LandmarkHead = [Head(oc, cfg.anchors, 10) for _ in levels]

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """x: [B, H, W, 3] image minus the mean -> loc [B, N, 4], conf (softmax) [B, N, 2], landmarks [B, N, 10]."""
        feats = self.fpn(self.body(x))
        feats = [ssh(f) for ssh, f in zip((self.ssh1, self.ssh2, self.ssh3), feats)]
        loc = mx.concatenate([h(f) for h, f in zip(self.BboxHead, feats)], axis=1)
        conf = mx.concatenate([h(f) for h, f in zip(self.ClassHead, feats)], axis=1)
        landms = mx.concatenate([h(f) for h, f in zip(self.LandmarkHead, feats)], axis=1)
        return loc, mx.softmax(conf, axis=-1, precise=True), landms


def priors(cfg: RetinaFaceConfig, height: int, width: int) -> np.ndarray:
    """facexlib's PriorBox: [N, 4] (cx, cy, w, h) normalised by the image size, float32, in head order."""
    out = []
    for step, sizes in zip(cfg.steps, cfg.min_sizes):
        for i, j in product(range(ceil(height / step)), range(ceil(width / step))):
            for s in sizes:
                out.append([(j + 0.5) * step / width, (i + 0.5) * step / height, s / width, s / height])
    return np.asarray(out, dtype=np.float32).reshape(-1, 4)


def decode(loc: np.ndarray, pri: np.ndarray, variance: tuple[float, float]) -> np.ndarray:
    """Box offsets -> (x1, y1, x2, y2) normalised."""
    v0, v1 = np.float32(variance[0]), np.float32(variance[1])
    centre = pri[:, :2] + loc[:, :2] * v0 * pri[:, 2:]
    size = pri[:, 2:] * np.exp(loc[:, 2:] * v1)
    x1y1 = centre - size / 2
    return np.concatenate([x1y1, size + x1y1], axis=1)


def decode_landmarks(pre: np.ndarray, pri: np.ndarray, variance: tuple[float, float]) -> np.ndarray:
    v0 = np.float32(variance[0])
    return np.concatenate([pri[:, :2] + pre[:, 2 * k : 2 * k + 2] * v0 * pri[:, 2:] for k in range(5)], axis=1)


def nms(dets: np.ndarray, threshold: float) -> list[int]:
    """Greedy NMS like torchvision.ops.nms: highest score first, no +1 in areas, a float32 IoU suppressed when it
    exceeds the threshold compared in double precision (as the C++ kernel promotes it)."""
    x1, y1, x2, y2, scores = (dets[:, i] for i in range(5))
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.maximum(np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(np.float32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou.astype(np.float64) <= threshold]
    return keep


def detect_faces(
    model: RetinaFace, image: np.ndarray, conf_threshold: float = 0.8, nms_threshold: float = 0.4
) -> np.ndarray:
    """facexlib `detect_faces(image, use_origin_size=True)`: [K, 15] float32 rows (x1, y1, x2, y2, score,
    5 landmarks x, y) in image pixels, best first. `image`: H x W x 3 uint8; the mean is subtracted in the
    channel order given (the official demo passes RGB where BGR is expected, and so do we)."""
    cfg = model.cfg
    h, w = image.shape[:2]
    x = mx.array(image.astype(np.float32)[None] - np.asarray(cfg.mean_bgr, dtype=np.float32))
    loc, conf, landms = (np.array(a[0]) for a in model(x))
    pri = priors(cfg, h, w)
    boxes = decode(loc, pri, cfg.variance) * np.array([w, h] * 2, dtype=np.float32)
    lms = decode_landmarks(landms, pri, cfg.variance) * np.array([w, h] * 5, dtype=np.float32)
    scores = conf[:, 1]
    inds = np.where(scores > conf_threshold)[0]
    boxes, lms, scores = boxes[inds], lms[inds], scores[inds]
    order = scores.argsort()[::-1]
    boxes, lms, scores = boxes[order], lms[order], scores[order]
    dets = np.hstack((boxes, scores[:, None])).astype(np.float32, copy=False)
    keep = nms(dets, nms_threshold)
    return np.concatenate((dets[keep], lms[keep]), axis=1).astype(np.float32)
