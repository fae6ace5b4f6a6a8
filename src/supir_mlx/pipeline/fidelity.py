"""Fidelity map: where a restored image departs from what its input supports.

SUPIR repaints the whole image; parts of the result are backed by the input, parts are invented. The map scores
every output pixel in [0, 1] from two measurements, both against the input alone (no model is involved):

- **drift** (low frequencies): the output is brought back to the input's resolution (area average) and given a
  global colour correction (a per-channel gain and offset fitted where output and input agree, so a region that
  was replaced does not bend the fit for the rest); the difference to the input, averaged over a Gaussian of
  1.5 input pixels (so the input's own noise and most JPEG error cancel), as RMS over the channels. It is large
  where shapes, edges or colours moved, appeared or vanished at scales the input resolves.
- **synthesis** (high frequencies): the luminance detail of the output finer than about one input pixel, as
  local energy, minus the same energy of the input upsampled bicubically to the output size; the square root of
  what is left (RMS luminance). It is large where the output has texture and sharpness the input does not have.

score = min(1, max(drift / DRIFT_FULL, synthesis / SYNTHESIS_FULL)). A score of 0.5 or more is *strong
invention* (a local colour difference of 2.5% of full scale, or 3% RMS of new fine detail).

What it cannot show: it compares against the degraded input, so detail that happens to be right (the model
guessing the true texture) scores the same as detail that is wrong; removing noise, blur or blocking shows as
drift only where it changes the picture at the input's scale; a global colour shift is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DRIFT_FULL = 0.05  # RMS over RGB ([0, 1] per channel): a local colour difference this large scores 1
SYNTHESIS_FULL = 0.06  # RMS luminance of new fine detail that scores 1
DRIFT_SIGMA = 1.5  # input pixels
STRONG, MODERATE = 0.5, 0.2
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass
class FidelityMap:
    score: np.ndarray  # H x W float32 in [0, 1], output size
    drift: np.ndarray  # H x W float32, RMS over RGB
    synthesis: np.ndarray  # H x W float32, RMS luminance

    def summary(self) -> dict[str, float]:
        """Shares of the area with strong (>= 0.5) and at least moderate (>= 0.2) invention, and means."""
        return {
            "strong_share": round(float((self.score >= STRONG).mean()), 4),
            "moderate_share": round(float((self.score >= MODERATE).mean()), 4),
            "mean_score": round(float(self.score.mean()), 4),
            "mean_drift": round(float(self.drift.mean()), 4),
            "mean_synthesis": round(float(self.synthesis.mean()), 4),
        }

    def render(self, output: np.ndarray) -> np.ndarray:
        """H x W x 3 uint8: the output in dim grey, with the score laid over it from transparent (0) through
        red and orange to yellow and white (1)."""
        grey = _as_float(output) @ _LUMA
        t = self.score
        heat = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=-1)
        alpha = np.clip(2 * t, 0, 1)[..., None]
        rgb = (0.35 * grey)[..., None] * (1 - alpha) + heat * alpha
        return (rgb * 255 + 0.5).astype(np.uint8)


def fidelity_map(source: np.ndarray, output: np.ndarray) -> FidelityMap:
    """The map of `output` (H x W x 3) against its `source` (h x w x 3); uint8, uint16 or float in [0, 1]."""
    src, out = _as_float(source), _as_float(output)
    (h, w), (H, W) = src.shape[:2], out.shape[:2]
    scale = max(W / w, H / h)

    down = _resize(out, (w, h), Image.BOX)
    diff = _gauss(_match_colours(down, src) - src, DRIFT_SIGMA)
    drift = _resize(np.sqrt((diff**2).mean(-1)), (W, H), Image.BILINEAR)

    y_out, y_up = out @ _LUMA, _resize(src @ _LUMA, (W, H), Image.BICUBIC)
    fine, window = max(1.0, scale / 2), max(2.0, scale)
    excess = _detail_energy(y_out, fine, window) - _detail_energy(y_up, fine, window)
    synthesis = np.sqrt(np.maximum(excess, 0))

    score = np.clip(np.maximum(drift / DRIFT_FULL, synthesis / SYNTHESIS_FULL), 0, 1).astype(np.float32)
    return FidelityMap(score, drift.astype(np.float32), synthesis.astype(np.float32))


def _detail_energy(y: np.ndarray, fine: float, window: float) -> np.ndarray:
    high = y - _gauss(y, fine)
    return _gauss(high * high, window)


def _match_colours(x: np.ndarray, ref: np.ndarray, rounds: int = 3) -> np.ndarray:
    """`x` with a per-channel gain and offset fitted to `ref` by least squares, refitted on the pixels whose
    residual is within 2.5 robust deviations, so that a replaced region does not bend the fit for the rest."""
    out = np.empty_like(x)
    for c in range(x.shape[-1]):
        a, b = x[..., c].ravel().astype(np.float64), ref[..., c].ravel().astype(np.float64)
        keep = np.ones(a.shape, bool)
        for _ in range(rounds):
            A = np.stack([a[keep], np.ones(keep.sum())], 1)
            (gain, offset), *_ = np.linalg.lstsq(A, b[keep], rcond=None)
            resid = np.abs(gain * a + offset - b)
            keep = resid <= 2.5 * 1.4826 * np.median(resid) + 1e-4
        out[..., c] = (gain * x[..., c] + offset).astype(np.float32)
    return out


def _gauss(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over the first two axes, edges replicated."""
    r = max(1, int(3 * sigma + 0.5))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    for axis in (0, 1):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (r, r)
        xp = np.pad(x, pad, mode="edge")
        n = x.shape[axis]
        acc = np.zeros(x.shape, np.float32)
        for i, wt in enumerate(k):
            acc += wt * (xp[i:i + n] if axis == 0 else xp[:, i:i + n])
        x = acc
    return x


def _resize(x: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """Float32 resize to (width, height) per channel through Pillow's float mode."""
    if x.ndim == 2:
        return np.asarray(Image.fromarray(np.ascontiguousarray(x, np.float32), "F").resize(size, resample))
    return np.stack([_resize(x[..., c], size, resample) for c in range(x.shape[-1])], axis=-1)


def _as_float(x) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x[..., :3].astype(np.float32) / 255
    if x.dtype == np.uint16:
        return x[..., :3].astype(np.float32) / 65535
    return np.clip(np.asarray(x, np.float32)[..., :3], 0, 1)


def fidelity_path(output: str | Path) -> Path:
    """Where `--fidelity-map` writes the map of `output`: `<stem>_fidelity.png` beside it."""
    output = Path(output)
    return output.with_name(f"{output.stem}_fidelity.png")
