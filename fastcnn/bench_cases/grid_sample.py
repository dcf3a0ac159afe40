"""Spatial Transformer sampler benchmark cases (Jaderberg et al. 2015): an affine grid applied with
bilinear sampling, zeros padding, align_corners=False, output size = input size, on

    mnist28      64 x  1 x  28 x  28   the STN paper's MNIST experiments
    rgb64        32 x  3 x  64 x  64   small RGB images
    imagenet224   8 x  3 x 224 x 224   an STN in front of an ImageNet classifier
    feat56       32 x 64 x  56 x  56   a transformer on a feature map (a ResNet stage-1 output)

θ is a random affine near the identity per sample (rotation ±30°, isotropic scale 0.8–1.2,
translation ±0.2 in each axis), drawn from the case's seeded generator. The headline figure is the
geometric mean of the ratio over the first three shapes (SUMMARY); feat56 is reported but kept out.

Providers: every fastcnn backend that runs on the device (fastcnn[cpu], fastcnn[cuda],
fastcnn[triton]), `fastcnn.ops.affine_grid_sample`, which never builds the grid; the same under
`torch.use_deterministic_algorithms(True)` (fastcnn[<backend>,deterministic]: on CUDA/Triton the
default backward accumulates with atomics and the deterministic one does not, so the pair gives the
cost of determinism; the CPU backward parallelises over the batch and is deterministic either way,
so there the pair should agree); on CUDA also fastcnn[cuda,deterministic,sort32] and
fastcnn[cuda,deterministic,gather], the deterministic backward's variants selected by
FASTCNN_CUDA_GRID_SAMPLE_DETERMINISTIC (narrow sort keys; no sort at all), not yet the default;
PyTorch eager `F.affine_grid` + `F.grid_sample` (the baseline,
"torch"); and optionally `torch.compile` of the same two calls. PyTorch's own CUDA grid-sampler
backward raises under deterministic algorithms, so there is no deterministic torch provider.
"""
import dataclasses
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import benchmarking
from . import Summary

OP = "grid_sample"
TITLE = "Spatial Transformer sampler (affine grid + bilinear grid_sample)"
# forward+backward[theta]: the STN training step, where the input is data and only theta needs a
# gradient (PyTorch then skips grad_input too). The figures are the first two.
MODES = ("forward", "forward+backward", "forward+backward[theta]")
LAYOUTS = ("nchw", "channels_last")
ARG_NAMES = ("input", "theta", "size", "mode", "padding_mode", "align_corners")
# Errors against fp64 on CPU too: grad_theta sums H*W*C terms per sample, and PyTorch's own fp32
# sum is off by ~0.25% of its scale on imagenet224, so an fp32 reference would bill PyTorch's
# rounding to whichever provider differs from it. fp64 grid sampling is cheap on CPU.
REFERENCE_DTYPE = torch.float64

# θ near the identity: rotation in [-30°, 30°], scale in [0.8, 1.2], translation in [-0.2, 0.2].
MAX_ROTATION = math.radians(30.0)
SCALE_RANGE = (0.8, 1.2)
MAX_TRANSLATION = 0.2


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    n: int
    c: int
    h: int
    w: int
    mode: str = "bilinear"
    padding_mode: str = "zeros"
    align_corners: bool = False

    @property
    def size(self):
        """The output size (N, C, H, W) given to affine_grid: the input's."""
        return (self.n, self.c, self.h, self.w)

    @property
    def label(self):
        return f"{self.n}x{self.c}x{self.h}x{self.w}"

    @property
    def params(self):
        return {"N": self.n, "C": self.c, "H": self.h, "W": self.w, "mode": self.mode,
                "padding_mode": self.padding_mode, "align_corners": self.align_corners}


# (name, N, C, H = W), in the order: the first three make the headline figure.
CASES = (
    ("mnist28", 64, 1, 28),
    ("rgb64", 32, 3, 64),
    ("imagenet224", 8, 3, 224),
    ("feat56", 32, 64, 56),
)
HEADLINE = tuple(name for name, *_ in CASES[:3])

SUMMARY = Summary(
    groups={"STN shapes (first three)": HEADLINE},
    note="Geometric mean over the first three STN shapes (the headline figure; feat56 is left out):",
    column="cases",
)


def shapes(quick: bool = False, batches: Optional[Sequence[int]] = None):
    """The cases; `quick` keeps the first three (the headline). `batches`, when given, replaces
    each case's batch size (one case per batch size)."""
    chosen = CASES[:3] if quick else CASES
    if batches is None:
        return [Shape(name, n, c, hw, hw) for name, n, c, hw in chosen]
    return [Shape(name, n, c, hw, hw) for n in batches for name, _, c, hw in chosen]


def random_theta(n: int, generator: torch.Generator) -> torch.Tensor:
    """n random affine matrices [n, 2, 3] near the identity (see the module docstring)."""

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)

    angle = uniform(-MAX_ROTATION, MAX_ROTATION)
    scale = uniform(*SCALE_RANGE)
    tx, ty = uniform(-MAX_TRANSLATION, MAX_TRANSLATION), uniform(-MAX_TRANSLATION, MAX_TRANSLATION)
    cos, sin = scale * torch.cos(angle), scale * torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    return theta.to(torch.float32)


def make_inputs(shape: Shape, generator: torch.Generator):
    x = torch.randn(shape.n, shape.c, shape.h, shape.w, generator=generator)
    theta = random_theta(shape.n, generator)
    return [x, theta, shape.size, shape.mode, shape.padding_mode, shape.align_corners]


def reference(x, theta, size, mode, padding_mode, align_corners):
    from .. import reference as ref

    return ref.affine_grid_sample(x, theta, size, mode, padding_mode, align_corners)


def _torch(x, theta, size, mode, padding_mode, align_corners):
    grid = F.affine_grid(theta, list(size), align_corners=align_corners)
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


def _fastcnn(x, theta, size, mode, padding_mode, align_corners):
    from .. import ops

    return ops.affine_grid_sample(x, theta, size, mode, padding_mode, align_corners)


def providers(device, compile: bool = False):
    specs = []
    for name in benchmarking.fastcnn_backends(device):
        specs.append(benchmarking.ProviderSpec(f"fastcnn[{name}]", _fastcnn, benchmarking.fastcnn_context(name)))
        # Determinism changes only the backward: a forward run of it would repeat fastcnn[<name>].
        specs.append(benchmarking.ProviderSpec(
            f"fastcnn[{name},deterministic]", _fastcnn, benchmarking.fastcnn_context(name, deterministic=True),
            modes=benchmarking.BACKWARD_MODES))
    if "cuda" in benchmarking.fastcnn_backends(device):
        for variant in ("sort32", "gather"):
            specs.append(benchmarking.ProviderSpec(
                f"fastcnn[cuda,deterministic,{variant}]", _fastcnn,
                benchmarking.fastcnn_context(
                    "cuda", deterministic=True, env={"FASTCNN_CUDA_GRID_SAMPLE_DETERMINISTIC": variant}),
                modes=benchmarking.BACKWARD_MODES))
    specs.append(benchmarking.ProviderSpec(benchmarking.BASELINE, _torch))
    if compile:
        # A fresh compile per case: dynamo's recompile limit is per code object, and hitting it
        # would silently fall back to eager.
        torch._dynamo.reset()
        specs.append(benchmarking.ProviderSpec("torch.compile", torch.compile(_torch, fullgraph=True, dynamic=False)))
    return specs


# Bilinear sampling: 4 taps, 4 multiply-adds per output element and channel.
FORWARD_FLOPS_PER_ELEMENT = 8
BACKWARD_FLOPS_PER_ELEMENT = 3 * FORWARD_FLOPS_PER_ELEMENT  # grad_input scatter + grad_theta


def cost(shape: Shape, mode: str, element_size: int):
    """(bytes, flops) a call cannot do without. Forward: read the input, write the output (θ is
    negligible and the grid is never built). Backward: read grad_output and the input, write
    grad_input (not with [theta]: θ's gradient alone)."""
    x = shape.n * shape.c * shape.h * shape.w
    y = shape.n * shape.c * shape.h * shape.w  # output size = input size
    fwd_bytes, fwd_flops = (x + y) * element_size, FORWARD_FLOPS_PER_ELEMENT * y
    bwd_bytes, bwd_flops = (y + x + x) * element_size, BACKWARD_FLOPS_PER_ELEMENT * y
    if mode == "forward+backward[theta]":
        return fwd_bytes + (y + x) * element_size, fwd_flops + 2 * FORWARD_FLOPS_PER_ELEMENT * y
    if mode == "forward":
        return fwd_bytes, fwd_flops
    if mode == "backward":
        return bwd_bytes, bwd_flops
    if mode == "forward+backward":
        return fwd_bytes + bwd_bytes, fwd_flops + bwd_flops
    raise ValueError(f"unknown mode {mode!r}")
