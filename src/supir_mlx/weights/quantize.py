"""Weight quantization of the big networks (UNet, control encoder, text encoders).

Linear layers become `QuantizedLinear` (MLX's quantized matmul, no dequantized copy ever exists; on the
CPU backend one layer's weight is dequantized per call, see the class). 3x3 convolutions, about a third of the UNet's weights, have no quantized kernel in MLX: `QuantizedConv2d`
stores them quantized and dequantizes one layer's weight just before its convolution, so at most one
full-precision conv weight (<= 30 MB at 1280 channels in fp16) lives at a time.

A `QuantSpec` is plain data saved next to converted weights: applying it to a freshly built model gives
the module tree those weights load into.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from ..models.layers import conv2d

# Module paths (SUPIRModel layout) quantized by default: the UNet with its connectors and the control encoder.
DEFAULT_SCOPE = ("model.diffusion_model.", "model.control_model.")
TEXT_SCOPE = ("conditioner.",)


class QuantizationError(ValueError):
    """A quantization setting MLX cannot do."""


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 64
    convs: bool = True  # also store 3x3 conv weights quantized
    scope: tuple[str, ...] = DEFAULT_SCOPE

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 5, 6, 8):
            raise QuantizationError(f"unsupported quantization bits {self.bits} (use 4 or 8)")
        if self.group_size not in (32, 64, 128):
            raise QuantizationError(f"unsupported group size {self.group_size} (32, 64 or 128)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any] | None) -> "QuantSpec | None":
        if d is None:
            return None
        return QuantSpec(d["bits"], d["group_size"], d["convs"], tuple(d["scope"]))


def _after(x: mx.array, *quantized: mx.array | None) -> list[mx.array | None]:
    """The quantized arrays, made to wait for the layer's input. A dequantization depends on weights alone, so
    MLX's scheduler runs them ahead of the layers that use them: 40 chained 8-bit layers held 30 dequantized
    weights at once (512 MB for 2048x2048 layers); waiting for `x` keeps it to the layer being run."""
    tied = mx.depends([q for q in quantized if q is not None], [x])
    return [None if q is None else tied.pop(0) for q in quantized]


class QuantizedLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear`, except on the CPU backend: MLX's CPU quantized matmul is scalar single-threaded
    code (0.6-1.5 GFLOP/s on SDXL's shapes on a 2-core x86 VM, 65-75x slower than dequantizing and calling
    BLAS; one 8-bit denoiser call took over 25 minutes), so there the weight is dequantized for the call.
    Only that layer's full-precision weight exists meanwhile (<= 52 MB: the 10240x1280 GEGLU in float32)."""

    def __call__(self, x: mx.array) -> mx.array:
        if mx.default_device() != mx.cpu:
            return super().__call__(x)
        w = mx.dequantize(*_after(x, self.weight, self.scales, self.get("biases")), self.group_size, self.bits,
                          mode=self.mode)
        w = w.astype(x.dtype).T
        return mx.addmm(self.bias, x, w) if "bias" in self else x @ w


class QuantizedConv2d(nn.Module):
    """A Conv2d whose weight [out, kh, kw, in] is kept quantized along kh*kw*in and dequantized per call."""

    def __init__(self, conv: nn.Conv2d, group_size: int, bits: int):
        super().__init__()
        w = conv.weight
        self.shape = tuple(w.shape)
        self.stride, self.padding = conv.stride, conv.padding
        self.group_size, self.bits = group_size, bits
        self.weight, self.scales, self.biases = mx.quantize(w.reshape(w.shape[0], -1), group_size, bits)
        if "bias" in conv:
            self.bias = conv.bias
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        w = mx.dequantize(*_after(x, self.weight, self.scales, self.biases), self.group_size, self.bits)
        return conv2d(x, w.reshape(self.shape).astype(x.dtype), self.get("bias"), self.stride, self.padding)


def _quantizable(module: nn.Module, spec: QuantSpec) -> bool:
    if isinstance(module, nn.Linear):
        return module.weight.shape[-1] % spec.group_size == 0
    if isinstance(module, nn.Conv2d) and spec.convs:
        return module.weight[0].size % spec.group_size == 0
    return False


def quantize(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Replace, in place, every quantizable Linear (and 3x3 conv if `spec.convs`) under `spec.scope`."""
    count = 0

    def swap(path: str, m: nn.Module) -> nn.Module:
        nonlocal count
        if not path.startswith(spec.scope) or not _quantizable(m, spec):
            return m
        count += 1
        if isinstance(m, nn.Linear):
            return QuantizedLinear.from_linear(m, spec.group_size, spec.bits)
        return QuantizedConv2d(m, spec.group_size, spec.bits)

    leaves = tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module)
    if not count:
        raise QuantizationError(f"nothing to quantize under {list(spec.scope)}")
    model.update_modules(leaves)
    return model


def materialize(model: nn.Module) -> None:
    """Evaluate the parameters one leaf module at a time: full-precision inputs of a lazy quantization
    (random or mapped from disk) are then freed layer by layer instead of all being alive at once."""
    for _, m in model.named_modules():
        if not m.children() or isinstance(m, (QuantizedLinear, QuantizedConv2d)):
            mx.eval(m.parameters())
    mx.eval(model.parameters())


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of all parameters as stored (quantized weights, scales and biases included); lazy, nothing evaluated."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))
