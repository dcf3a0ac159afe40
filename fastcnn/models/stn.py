"""Small digit classifiers with and without a Spatial Transformer in front (Jaderberg et al. 2015,
"Spatial Transformer Networks", arXiv:1506.02025, Section 4.1: distorted MNIST), built on
`fastcnn.nn.SpatialTransformer`.

    stn_classifier:        SpatialTransformer -> SmallCNN
        localisation  conv 7x7 (8) - maxpool 2 - ReLU - conv 5x5 (10) - maxpool 2 - ReLU
                      - fc 32 - ReLU - fc_loc 6 (identity at initialisation)
        classifier    conv 5x5 (10) - maxpool 2 - ReLU - conv 5x5 (20) - maxpool 2 - ReLU
                      - fc 50 - ReLU - dropout - fc num_classes
    plain_cnn_classifier:  SmallCNN alone, convolutions widened to 12 and 24 channels so that both
                           models have about as many parameters (27,296 against 27,360 for a
                           28 x 28 single-channel input and 10 classes).

The layer sizes follow the paper's small ST-CNN for MNIST (two conv-pool-ReLU stages in the
localisation net and in the classifier) at the scale of PyTorch's STN tutorial, so that a CPU trains
either model in seconds per epoch. The paper's comparison is an ST-CNN against a CNN of about the
same capacity; ``plain_cnn_classifier`` is that baseline. Softmax is left to the loss.
"""
from collections import OrderedDict
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..nn import SpatialTransformer

__all__ = ["SmallCNN", "STNClassifier", "plain_cnn_classifier", "stn_classifier"]

Size = Union[int, Sequence[int]]


def _hw(size: Size, name: str) -> Tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (
        not isinstance(size, (tuple, list, torch.Size))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ValueError(f"{name} must be a positive int or a pair (H, W) of positive ints, got {size!r}")
    return (size[0], size[1])


def _conv_pool_size(hw: Tuple[int, int], kernels: Sequence[int], what: str) -> Tuple[int, int]:
    """Spatial size after each (valid conv k, maxpool 2) stage; an error if it vanishes."""
    h, w = hw
    for k in kernels:
        h, w = (h - k + 1) // 2, (w - k + 1) // 2
        if h < 1 or w < 1:
            raise ValueError(f"{what}: input of size {hw} is too small for convolutions {tuple(kernels)} each followed by a 2x2 max-pool")
    return h, w


def conv_pool_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """Valid convolution, 2x2 max-pool, ReLU (max and ReLU commute: pooling first, ReLU on 4x fewer values)."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, kernel_size),
            pool=nn.MaxPool2d(2),
            relu=nn.ReLU(inplace=True),
        )
    )


class SmallCNN(nn.Module):
    """Two conv-pool-ReLU stages (5x5 convolutions) and two fully connected layers.

    ``features`` holds the convolutional stages, ``classifier`` flatten - fc ``hidden`` - ReLU -
    dropout - fc ``num_classes``.

    Args:
        num_classes: outputs of the last layer.
        in_channels: channels of the input image.
        input_size: H and W of the input (an int for a square input), which sets the first fully
            connected layer's width.
        channels: output channels of the two convolutions.
        hidden: width of the hidden fully connected layer.
        dropout: dropout probability before the last layer.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: Size = 28,
        channels: Sequence[int] = (10, 20),
        hidden: int = 50,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.input_size = _hw(input_size, "SmallCNN: input_size")
        if len(channels) != 2:
            raise ValueError(f"SmallCNN: channels must have two entries (one per convolution), got {channels!r}")
        c1, c2 = channels
        h, w = _conv_pool_size(self.input_size, (5, 5), "SmallCNN")
        self.features = nn.Sequential(conv_pool_relu(in_channels, c1, 5), conv_pool_relu(c1, c2, 5))
        self.num_features = c2 * h * w
        self.classifier = nn.Sequential(
            OrderedDict(
                flatten=nn.Flatten(),
                fc1=nn.Linear(self.num_features, hidden),
                relu=nn.ReLU(inplace=True),
                dropout=nn.Dropout(dropout),
                fc2=nn.Linear(hidden, num_classes),
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def localization_network(in_channels: int, input_size: Size, channels: Sequence[int] = (8, 10), hidden: int = 32) -> nn.Sequential:
    """The STN's localisation net: conv 7x7 - pool - ReLU - conv 5x5 - pool - ReLU - fc ``hidden`` -
    ReLU. Its output (``hidden`` features) feeds the transformer's ``fc_loc`` regressor."""
    if len(channels) != 2:
        raise ValueError(f"localization_network: channels must have two entries, got {channels!r}")
    c1, c2 = channels
    h, w = _conv_pool_size(_hw(input_size, "localization_network: input_size"), (7, 5), "localization_network")
    return nn.Sequential(
        conv_pool_relu(in_channels, c1, 7),
        conv_pool_relu(c1, c2, 5),
        nn.Flatten(),
        nn.Linear(c2 * h * w, hidden),
        nn.ReLU(inplace=True),
    )


class STNClassifier(nn.Module):
    """``classifier(stn(x))``: a `SpatialTransformer` that warps the input, then a classifier.

    ``stn.theta(x)`` gives the transforms and ``stn(x)`` the warped images, for visualisation.
    """

    def __init__(self, stn: SpatialTransformer, classifier: nn.Module) -> None:
        super().__init__()
        self.stn = stn
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.stn(x))


def stn_classifier(
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: Size = 28,
    output_size: Optional[Size] = None,
    channels: Sequence[int] = (10, 20),
    hidden: int = 50,
    dropout: float = 0.5,
    localization_channels: Sequence[int] = (8, 10),
    localization_hidden: int = 32,
    **sampler_kwargs,
) -> STNClassifier:
    """A `SmallCNN` with a `SpatialTransformer` in front, initialised to the identity transform.

    Args:
        num_classes, in_channels, channels, hidden, dropout: as in `SmallCNN`.
        input_size: H and W of the input images.
        output_size: H and W of the transformer's output, which the classifier sees; ``None`` keeps
            ``input_size``.
        localization_channels, localization_hidden: widths of the localisation network.
        sampler_kwargs: ``mode``, ``padding_mode``, ``align_corners`` for the sampler.
    """
    input_size = _hw(input_size, "stn_classifier: input_size")
    output_size = input_size if output_size is None else _hw(output_size, "stn_classifier: output_size")
    stn = SpatialTransformer(
        localization_network(in_channels, input_size, localization_channels, localization_hidden),
        output_size=output_size,
        localization_features=localization_hidden,
        **sampler_kwargs,
    )
    classifier = SmallCNN(num_classes, in_channels, output_size, channels, hidden, dropout)
    return STNClassifier(stn, classifier)


def plain_cnn_classifier(
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: Size = 28,
    channels: Sequence[int] = (12, 24),
    hidden: int = 50,
    dropout: float = 0.5,
) -> SmallCNN:
    """The baseline for `stn_classifier`: the same `SmallCNN` without a transformer, its
    convolutions widened (12 and 24 channels instead of 10 and 20) to about the same parameter
    count as the STN classifier with default arguments."""
    return SmallCNN(num_classes, in_channels, input_size, channels, hidden, dropout)
