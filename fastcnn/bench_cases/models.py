"""Whole-model benchmark cases: what a user of `fastcnn.models` gets end to end, where the op
benchmarks time one layer.

    mobilenet_v1  MobileNet v1 (Howard et al. 2017), alpha 1.0, 1000 classes, 3 x 224 x 224, at
                  batch 1 (inference latency) and 8
    tv_mobilenet_v2  torchvision's MobileNet v2 (Sandler et al. 2018), 1000 classes, passed through
                  fastcnn.nn.convert (its 17 depthwise convolutions), at the same batches; left out
                  where torchvision is not installed
    tv_mobilenet_v3_large  torchvision's MobileNet v3-Large (Howard et al. 2019) the same way (15
                  depthwise convolutions, six of them 5x5)
    stn_mnist     the STN classifier of examples/stn_digits.py (Jaderberg et al. 2015), 64 x 1 x 28 x 28

forward is inference (no autograd graph); forward+backward is a training step's compute (gradients
of every parameter and of the input; parameter gradients reset to None before each call, as
`zero_grad()` does). Both run the models in eval mode: BatchNorm normalises with its running
statistics (frozen, as when fine-tuning) and dropout is off, so that every call, mode and provider
computes the same function of the same weights and one reference checks them all (train-mode
statistics would make the two modes different functions, and running statistics and dropout masks
would drift between providers). The STN's regressor starts at a fixed transform near the identity
(rotation 10 degrees, scale 0.9) instead of the identity, as after some training.

Layouts: channels_last runs a channels_last copy of the model on a channels_last input, told apart
by its strides (the STN classifier's input has one channel, contiguous in both layouts).

Providers: one model, built once from a fixed seed, run under each fastcnn backend that runs on the
device (fastcnn[cpu], fastcnn[cuda], fastcnn[triton]) and under the `reference` backend, where
every fastcnn layer calls the stock PyTorch op it replaces (F.conv2d(groups=C), F.affine_grid +
F.grid_sample): that is the baseline, "torch". Everything else in the models (1x1 and stem
convolutions, BatchNorm, ReLU, pooling, linear layers) is stock PyTorch in both, so the ratio is
the end-to-end gain of swapping the layers, not of the kernels alone. No torch.compile provider:
compiling a whole model on a 2-core CPU takes minutes.
"""
import dataclasses
import math
from typing import Optional, Sequence

import torch
from torch import nn

from .. import benchmarking

OP = "models"
TITLE = "Whole models built from fastcnn layers (fastcnn.models)"
MODES = ("forward", "forward+backward")
LAYOUTS = ("nchw", "channels_last")
ARG_NAMES = ("input", "model")
MOBILENET_BATCHES = (1, 8)


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str  # the model, a key of _BUILDERS
    n: int
    c: int
    h: int
    w: int

    @property
    def label(self):
        return f"{self.n}x{self.c}x{self.h}x{self.w}"

    @property
    def params(self):
        return {"N": self.n, "C": self.c, "H": self.h, "W": self.w, "model": self.name}


def _mobilenet_v1():
    from ..models import mobilenet_v1

    return mobilenet_v1()


def _stn_mnist():
    from ..models import stn_classifier

    model = stn_classifier()
    angle, scale = math.radians(10.0), 0.9
    with torch.no_grad():
        model.stn.fc_loc.bias.copy_(torch.tensor([scale * math.cos(angle), -scale * math.sin(angle), 0.0,
                                           scale * math.sin(angle), scale * math.cos(angle), 0.0]))
    return model


def _torchvision_mobilenet_v2():
    import torchvision

    from ..nn import convert

    return convert(torchvision.models.mobilenet_v2())


def _torchvision_mobilenet_v3_large():
    import torchvision

    from ..nn import convert

    return convert(torchvision.models.mobilenet_v3_large())


def _has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


_BUILDERS = {"mobilenet_v1": _mobilenet_v1, "tv_mobilenet_v2": _torchvision_mobilenet_v2,
             "tv_mobilenet_v3_large": _torchvision_mobilenet_v3_large, "stn_mnist": _stn_mnist}
_TORCHVISION = ("tv_mobilenet_v2", "tv_mobilenet_v3_large")
_CLASSES = {"mobilenet_v1": 1000, "tv_mobilenet_v2": 1000, "tv_mobilenet_v3_large": 1000, "stn_mnist": 10}
_IMAGES = {"mobilenet_v1": (3, 224, 224), "tv_mobilenet_v2": (3, 224, 224), "tv_mobilenet_v3_large": (3, 224, 224),
           "stn_mnist": (1, 28, 28)}
CALIBRATION_BATCH = 4
_MODELS = {}


def _model(name: str, dtype: torch.dtype, device: torch.device, channels_last: bool) -> nn.Module:
    """The model `name` in `dtype` on `device`, built once from seed 0 (the same weights for every
    provider, layout and dtype), its BatchNorm statistics those of one random batch."""
    key = (name, dtype, str(device), channels_last)
    if key not in _MODELS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = _BUILDERS[name]()
            _calibrate(model, torch.randn(CALIBRATION_BATCH, *_IMAGES[name]))
        model = model.to(device=device, dtype=dtype).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        _MODELS[key] = model
    return _MODELS[key]


def _calibrate(model: nn.Module, batch: torch.Tensor) -> None:
    """Sets every BatchNorm's running statistics to those of `batch` (one train-mode pass with a
    cumulative average). The initial ones (mean 0, variance 1) would not normalise anything: in eval
    mode MobileNet's activations then shrink about sqrt(C)-fold at each depthwise layer (He
    initialisation counts a depthwise kernel's fan-out over every channel) and vanish before the
    classifier, leaving outputs near 1e-25 and an error check that checks nothing."""
    from .. import use_backend

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad(), use_backend("reference"):
        model(batch)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


def shapes(quick: bool = False, batches: Optional[Sequence[int]] = None):
    """`batches` replaces the MobileNets' batch sizes; the STN classifier stays at its 64."""
    if batches is None:
        batches = (1,) if quick else MOBILENET_BATCHES
    mobilenets = ["mobilenet_v1"] + (list(_TORCHVISION) if _has_torchvision() else [])
    return [Shape(name, n, 3, 224, 224) for name in mobilenets for n in batches] + [Shape("stn_mnist", 64, 1, 28, 28)]


def make_inputs(shape: Shape, generator: torch.Generator):
    return [torch.randn(shape.n, shape.c, shape.h, shape.w, generator=generator), shape.name]


def _channels_last(x: torch.Tensor) -> bool:
    # By the strides: with one channel both layouts are contiguous, and only stride(1) == 1 says
    # that the tensor was laid out channels_last.
    return x.dim() == 4 and x.stride(1) == 1 and x.shape[2] * x.shape[3] > 1


def run(x: torch.Tensor, name: str) -> torch.Tensor:
    """Inference when x needs no gradient, else a training step's forward (its backward follows)."""
    model = _model(name, x.dtype, x.device, _channels_last(x))
    if not x.requires_grad:
        with torch.no_grad():
            return model(x)
    for p in model.parameters():
        p.grad = None
    return model(x)


def reference(x, name):
    from .. import use_backend

    if x.device.type == "meta":  # the output's shape (benchmarking.case_inputs)
        return torch.empty(x.shape[0], _CLASSES[name], device="meta")
    with use_backend("reference"):
        return run(x, name)


def providers(device, compile: bool = False):
    specs = [
        benchmarking.ProviderSpec(f"fastcnn[{name}]", run, benchmarking.fastcnn_context(name))
        for name in benchmarking.fastcnn_backends(device)
    ]
    specs.append(benchmarking.ProviderSpec(benchmarking.BASELINE, run, benchmarking.fastcnn_context("reference")))
    return specs


def _mult_adds(name: str, shape: Shape) -> int:
    from ..models.mobilenet import count_mult_adds

    model = _model(name, torch.float32, torch.device("cpu"), False)
    return count_mult_adds(model, (shape.h, shape.w), in_channels=shape.c) * shape.n


def cost(shape: Shape, mode: str, element_size: int):
    """(bytes, flops): the convolutions' and linear layers' multiply-adds, 2 flops each, three times
    that for forward+backward (the gradients of input and weight); bytes only the input and output,
    so the floor is the arithmetic at the matmul rate."""
    flops = 2 * _mult_adds(shape.name, shape)
    nbytes = (shape.n * shape.c * shape.h * shape.w) * element_size
    if mode == "forward":
        return nbytes, flops
    if mode == "forward+backward":
        return 2 * nbytes, 3 * flops
    raise ValueError(f"unknown mode {mode!r}")
