"""Depthwise conv2d benchmark cases: the 13 depthwise layers of MobileNet v1 (Howard et al. 2017,
Table 1, 224x224 input; the five identical 512x14x14 layers measured once) at batch 1 and 32, plus
MobileNet v3-Large's four 5x5 depthwise shapes at the same batch sizes, ConvNeXt-T's four 7x7
shapes at batch 8, and large kernels at 8x128x56x56: 7x7 (ConvNeXt's depthwise conv, with bias)
and 31x31 (RepLKNet's, without), padding k // 2.

Providers: every fastcnn backend that runs on the device (fastcnn[cpu], fastcnn[cuda],
fastcnn[triton]); on CUDA also fastcnn[cuda,cl-rows], the channels_last cases with
FASTCNN_CUDA_DEPTHWISE_CL=rows (the register-tap row-segment forward kernel), and
fastcnn[cuda,nchw-vec], the NCHW cases with FASTCNN_CUDA_DEPTHWISE_NCHW=vec (vector loads), both
not yet the default;
PyTorch eager `F.conv2d(groups=C)` (the baseline, "torch"), and optionally `torch.compile` of the
same F.conv2d call.
"""
import dataclasses
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import benchmarking
from . import Summary

OP = "depthwise"
TITLE = "Depthwise conv2d"
MODES = ("forward", "forward+backward")
LAYOUTS = ("nchw", "channels_last")
ARG_NAMES = ("input", "weight", "bias", "stride", "padding")
BATCHES = (1, 32)


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    n: int
    c: int
    h: int
    w: int
    k: int
    stride: int
    bias: bool = False
    repeat: int = 1  # how many layers of the network have this shape

    @property
    def padding(self):
        return self.k // 2

    @property
    def out_hw(self):
        return tuple((size + 2 * self.padding - self.k) // self.stride + 1 for size in (self.h, self.w))

    @property
    def label(self):
        return f"{self.n}x{self.c}x{self.h}x{self.w} k{self.k} s{self.stride}"

    @property
    def params(self):
        return {"N": self.n, "C": self.c, "H": self.h, "W": self.w, "k": self.k, "stride": self.stride,
                "padding": self.padding, "bias": self.bias, "repeat": self.repeat}


# MobileNet v1, Table 1: (name, C, H = W, stride). 224x224 input, 3x3 kernels, no bias (BN follows).
MOBILENET_V1 = (
    ("mbv1-dw1", 32, 112, 1, 1),
    ("mbv1-dw2", 64, 112, 2, 1),
    ("mbv1-dw3", 128, 56, 1, 1),
    ("mbv1-dw4", 128, 56, 2, 1),
    ("mbv1-dw5", 256, 28, 1, 1),
    ("mbv1-dw6", 256, 28, 2, 1),
    ("mbv1-dw7-11", 512, 14, 1, 5),
    ("mbv1-dw12", 512, 14, 2, 1),
    ("mbv1-dw13", 1024, 7, 1, 1),
)
# MobileNet v3-Large's 5x5 depthwise layers (Howard et al. 2019, Table 1, 224x224 input; the
# expanded channels): (name, C, H = W, stride, how many). EfficientNet and MnasNet have the same
# kind.
MOBILENET_V3_5X5 = (
    ("mbv3-k5-1", 72, 56, 2, 1),
    ("mbv3-k5-2", 120, 28, 1, 2),
    ("mbv3-k5-3", 672, 14, 2, 1),
    ("mbv3-k5-4", 960, 7, 1, 2),
)
# ConvNeXt-T's 7x7 depthwise layers (Liu et al. 2022; 224x224 input, stages of 3, 3, 9 and 3
# blocks, with bias), at batch 8: (name, C, H = W, how many).
CONVNEXT_T = (
    ("convnext-s1", 96, 56, 3),
    ("convnext-s2", 192, 28, 3),
    ("convnext-s3", 384, 14, 9),
    ("convnext-s4", 768, 7, 3),
)
CONVNEXT_N = 8
# The report's geometric means over the MobileNet v1 layers, MobileNet v3's 5x5 ones and
# ConvNeXt-T's 7x7 ones, one per batch size, each layer counted as often as the network has it.
SUMMARY = Summary(
    groups={"mbv1": ("mbv1-*",), "mbv3 5x5": ("mbv3-k5-*",), "convnext-t 7x7": ("convnext-*",)},
    note="Geometric means over a model's layers (each layer counted as often as the model has it):",
    column="model",
    by_batch=True,
)
# Large kernels at 8x128x56x56: (name, k, bias).
LARGE_KERNELS = (("k7", 7, True), ("k31", 31, False))
LARGE_N, LARGE_C, LARGE_HW = 8, 128, 56

# --quick: batch 1 only, no ConvNeXt layers and no 31x31 (on a 2-core CPU one 31x31
# channels_last backward in PyTorch takes seconds).
QUICK_LARGE = ("k7",)


def shapes(quick: bool = False, batches: Optional[Sequence[int]] = None):
    """The cases. `batches` applies to the MobileNet layers; ConvNeXt's and the large kernels stay at N=8."""
    if batches is None:
        batches = (1,) if quick else BATCHES
    cases = [
        Shape(f"{name}", n, c, hw, hw, k, stride, False, repeat)
        for k, layers in ((3, MOBILENET_V1), (5, MOBILENET_V3_5X5))
        for n in batches
        for name, c, hw, stride, repeat in layers
    ]
    if not quick:
        cases += [Shape(name, CONVNEXT_N, c, hw, hw, 7, 1, True, repeat) for name, c, hw, repeat in CONVNEXT_T]
    cases += [
        Shape(name, LARGE_N, LARGE_C, LARGE_HW, LARGE_HW, k, 1, bias)
        for name, k, bias in LARGE_KERNELS
        if not quick or name in QUICK_LARGE
    ]
    return cases


def make_inputs(shape: Shape, generator: torch.Generator):
    x = torch.randn(shape.n, shape.c, shape.h, shape.w, generator=generator)
    # Scaled like a trained layer's weights so outputs are O(1) and absolute errors comparable.
    w = torch.randn(shape.c, 1, shape.k, shape.k, generator=generator) / shape.k
    b = torch.randn(shape.c, generator=generator) if shape.bias else None
    return [x, w, b, shape.stride, shape.padding]


def reference(x, w, b, stride, padding):
    from .. import reference as ref

    return ref.depthwise_conv2d(x, w, b, stride, padding)


def _torch(x, w, b, stride, padding):
    return F.conv2d(x, w, b, stride, padding, 1, x.shape[1])


def _fastcnn(x, w, b, stride, padding):
    from .. import ops

    return ops.depthwise_conv2d(x, w, b, stride, padding)


def providers(device, compile: bool = False):
    specs = [
        benchmarking.ProviderSpec(f"fastcnn[{name}]", _fastcnn, benchmarking.fastcnn_context(name))
        for name in benchmarking.fastcnn_backends(device)
    ]
    if "cuda" in benchmarking.fastcnn_backends(device):
        specs.append(benchmarking.ProviderSpec(
            "fastcnn[cuda,cl-rows]", _fastcnn,
            benchmarking.fastcnn_context("cuda", env={"FASTCNN_CUDA_DEPTHWISE_CL": "rows"}),
            layouts=("channels_last",)))
        specs.append(benchmarking.ProviderSpec(
            "fastcnn[cuda,nchw-vec]", _fastcnn,
            benchmarking.fastcnn_context("cuda", env={"FASTCNN_CUDA_DEPTHWISE_NCHW": "vec"}),
            layouts=("nchw",)))
    specs.append(benchmarking.ProviderSpec(benchmarking.BASELINE, _torch))
    if compile:
        # A fresh compile per case: dynamo's recompile limit is per code object, and hitting it
        # would silently fall back to eager.
        torch._dynamo.reset()
        specs.append(benchmarking.ProviderSpec("torch.compile", torch.compile(_torch, fullgraph=True, dynamic=False)))
    return specs


def cost(shape: Shape, mode: str, element_size: int):
    """(bytes, flops) a call cannot do without: every tensor read or written once."""
    ho, wo = shape.out_hw
    x = shape.n * shape.c * shape.h * shape.w
    y = shape.n * shape.c * ho * wo
    w = shape.c * shape.k * shape.k
    b = shape.c if shape.bias else 0
    macs = y * shape.k * shape.k
    fwd_bytes = (x + w + b + y) * element_size
    fwd_flops = 2 * macs + (y if shape.bias else 0)
    # grad_input and grad_weight: 2 macs each per forward mac; grad_bias sums grad_output.
    bwd_bytes = (y + x + w + x + w + b) * element_size
    bwd_flops = 4 * macs + (y if shape.bias else 0)
    if mode == "forward":
        return fwd_bytes, fwd_flops
    if mode == "backward":
        return bwd_bytes, bwd_flops
    if mode == "forward+backward":
        return fwd_bytes + bwd_bytes, fwd_flops + bwd_flops
    raise ValueError(f"unknown mode {mode!r}")
