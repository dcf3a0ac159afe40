"""MobileNet v1 (Howard et al. 2017, "MobileNets: Efficient Convolutional Neural Networks for Mobile
Vision Applications", arXiv:1704.04861), built on `fastcnn.nn.DepthwiseConv2d`.

Table 1 of the paper, for width multiplier alpha = 1 and a 224 x 224 input:

    conv 3x3, stride 2, 3 -> 32                              112 x 112
    13 depthwise-separable blocks (dw 3x3 + BN + ReLU, pw 1x1 + BN + ReLU):
        (out channels, dw stride): 64 s1, 128 s2, 128 s1, 256 s2, 256 s1, 512 s2,
        5 x (512 s1), 1024 s2, 1024 s1                       -> 7 x 7 x 1024
    global average pool, fully connected 1024 -> 1000 (softmax left to the loss)

Every convolution is bias-free and followed by BatchNorm and ReLU (not ReLU6). The width multiplier
alpha scales every channel count to int(c * alpha). The resolution multiplier rho only sets the
input size the model is meant for, ``model.input_size = round(224 * rho)`` (the paper's rho = 0.857,
0.714, 0.571 give 192, 160, 128); the network itself accepts any size through global average pooling.

Trainable parameters (conv weights, BN gamma and beta, FC weight and bias; BN running statistics are
buffers, not parameters) match the paper and Keras' reference: 4,231,976 for alpha = 1.0 and
1,331,592 for alpha = 0.5 with 1000 classes. `count_mult_adds` counts convolution and FC
multiply-adds: 568.7 M at 224 x 224 for alpha = 1.0 (the paper's 569 M).
"""
import copy
from collections import OrderedDict
from typing import Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import backends
from ..nn import DepthwiseConv2d

__all__ = ["MobileNetV1", "mobilenet_v1", "count_mult_adds"]

# (output channels, stride of the depthwise conv) of the 13 depthwise-separable blocks, Table 1.
BLOCKS: Tuple[Tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)
STEM_CHANNELS = 32
BASE_RESOLUTION = 224


def _scaled(channels: int, width_mult: float) -> int:
    return max(1, int(channels * width_mult))


def conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Full 3x3 convolution (the stem), BatchNorm, ReLU."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            bn=nn.BatchNorm2d(out_channels),
            relu=nn.ReLU(inplace=True),
        )
    )


def depthwise_separable(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 conv + BN + ReLU, then pointwise 1x1 conv + BN + ReLU (Figure 3, right)."""
    return nn.Sequential(
        OrderedDict(
            dw_conv=DepthwiseConv2d(in_channels, in_channels, 3, stride=stride, padding=1, bias=False),
            dw_bn=nn.BatchNorm2d(in_channels),
            dw_relu=nn.ReLU(inplace=True),
            pw_conv=nn.Conv2d(in_channels, out_channels, 1, bias=False),
            pw_bn=nn.BatchNorm2d(out_channels),
            pw_relu=nn.ReLU(inplace=True),
        )
    )


class MobileNetV1(nn.Module):
    """MobileNet v1. ``features`` holds the stem (``features.0``) and the 13 depthwise-separable
    blocks (``features.1`` .. ``features.13``); then ``avgpool``, ``dropout`` (p = 0 by default, as
    in the paper) and the classifier ``fc``.

    Args:
        width_mult: the paper's alpha; every channel count c becomes int(c * alpha).
        num_classes: outputs of the final fully connected layer.
        resolution_mult: the paper's rho; recorded as ``input_size = round(224 * rho)``.
        dropout: dropout probability before ``fc``.
        in_channels: channels of the input image.
    """

    def __init__(
        self,
        width_mult: float = 1.0,
        num_classes: int = 1000,
        resolution_mult: float = 1.0,
        dropout: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if not width_mult > 0:
            raise ValueError(f"MobileNetV1: width_mult must be positive, got {width_mult}")
        if not 0 < resolution_mult:
            raise ValueError(f"MobileNetV1: resolution_mult must be positive, got {resolution_mult}")
        self.width_mult = width_mult
        self.resolution_mult = resolution_mult
        self.input_size = int(round(BASE_RESOLUTION * resolution_mult))
        self.num_classes = num_classes

        channels = _scaled(STEM_CHANNELS, width_mult)
        layers = [conv_bn_relu(in_channels, channels, stride=2)]
        for out, stride in BLOCKS:
            out = _scaled(out, width_mult)
            layers.append(depthwise_separable(channels, out, stride))
            channels = out
        self.features = nn.Sequential(*layers)
        self.num_features = channels
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal convolutions (fan_out), BN gamma = 1 and beta = 0, FC N(0, 0.01), zero FC bias."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # DepthwiseConv2d included
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))

    def extra_repr(self) -> str:
        return f"width_mult={self.width_mult}, resolution_mult={self.resolution_mult}, input_size={self.input_size}"


def mobilenet_v1(
    width_mult: float = 1.0, num_classes: int = 1000, resolution_mult: float = 1.0, **kwargs
) -> MobileNetV1:
    """MobileNet v1 with width multiplier ``width_mult`` (alpha) and resolution multiplier
    ``resolution_mult`` (rho; sets ``model.input_size``). Extra keyword arguments go to `MobileNetV1`
    (``dropout``, ``in_channels``). Randomly initialised: fastcnn ships no pretrained weights."""
    return MobileNetV1(width_mult=width_mult, num_classes=num_classes, resolution_mult=resolution_mult, **kwargs)


def count_mult_adds(model: nn.Module, input_size: Union[int, Sequence[int], None] = None, in_channels: int = 3) -> int:
    """Multiply-adds of one forward pass on a single image, counted as the paper counts them:
    every convolution (out elements x in_channels / groups x kH x kW) and every fully connected
    layer (in x out). BatchNorm, ReLU, pooling and biases are not counted.

    ``input_size`` is an int, an (H, W) pair, or None for ``model.input_size``. A copy of the model
    runs once on a 1-image batch on the meta device (shapes only); ``model`` itself is not touched.
    """
    if input_size is None:
        input_size = getattr(model, "input_size", BASE_RESOLUTION)
    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    total = 0

    def conv_hook(module, inputs, output):
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module, inputs, output):
        nonlocal total
        total += output.numel() * module.in_features

    # Only shapes matter: run a copy on the meta device (no memory, no arithmetic).
    meta_model = copy.deepcopy(model).to("meta").eval()
    for m in meta_model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(conv_hook)
        elif isinstance(m, nn.Linear):
            m.register_forward_hook(linear_hook)
    dtype = next(model.parameters()).dtype
    with torch.no_grad(), backends.use_backend("reference"):  # stock ops have meta kernels
        meta_model(torch.empty(1, in_channels, h, w, device="meta", dtype=dtype))
    return total
