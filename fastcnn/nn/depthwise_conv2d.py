"""`DepthwiseConv2d`: a drop-in for ``nn.Conv2d(C, C, k, groups=C)`` running `fastcnn.ops.depthwise_conv2d`.

It subclasses `nn.Conv2d`, so it takes the same constructor arguments, owns the same parameters
(``weight`` of shape [C, 1, kH, kW], ``bias`` of shape [C]) with the same initialisation, and its
state_dict loads into an ``nn.Conv2d(C, C, k, groups=C)`` and back. ``isinstance(layer, nn.Conv2d)``
holds, so code that walks a model for its convolutions (initialisers, FLOP counters, fusers) still
finds it. Only the computation differs: it goes through the fastcnn op and the backend chosen by
`fastcnn.backends` (C++ kernel, Triton kernel, or the stock-PyTorch reference).
"""
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import depthwise_conv2d as _depthwise_conv2d

__all__ = ["DepthwiseConv2d"]


class DepthwiseConv2d(nn.Conv2d):
    r"""Depthwise 2-D convolution: every channel is convolved with its own ``kH x kW`` filter.

    Same arguments and semantics as ``nn.Conv2d(in_channels, in_channels, kernel_size, stride,
    padding, dilation, groups=in_channels, bias, padding_mode, device, dtype)``. ``out_channels``
    must equal ``in_channels`` (a channel multiplier > 1 is not supported) and ``groups``, when
    given, must equal ``in_channels``. ``padding`` is an int, a pair, ``'same'`` or ``'valid'``;
    ``padding_mode`` other than ``'zeros'`` pads with ``F.pad`` first, exactly as ``nn.Conv2d`` does.

    Example::

        >>> layer = DepthwiseConv2d(32, 32, 3, stride=2, padding=1, bias=False)
        >>> layer(torch.randn(8, 32, 56, 56)).shape
        torch.Size([8, 32, 28, 28])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: Optional[int] = None,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
    ) -> None:
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels <= 0:
            raise ValueError(f"DepthwiseConv2d: in_channels must be a positive int, got {in_channels!r}")
        if out_channels != in_channels:
            raise ValueError(
                f"DepthwiseConv2d: out_channels must equal in_channels (one filter per channel), got "
                f"in_channels={in_channels}, out_channels={out_channels}; for a channel multiplier "
                f"use nn.Conv2d({in_channels}, {out_channels}, ..., groups={in_channels})"
            )
        if groups is None:
            groups = in_channels
        elif groups != in_channels:
            raise ValueError(
                f"DepthwiseConv2d: groups must equal in_channels ({in_channels}) for a depthwise "
                f"convolution, got groups={groups}; use nn.Conv2d for other group counts"
            )
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return _depthwise_conv2d(input, weight, bias, self.stride, 0, self.dilation)
        return _depthwise_conv2d(input, weight, bias, self.stride, self.padding, self.dilation)

    @classmethod
    def _shell_of(cls, conv: nn.Conv2d) -> "DepthwiseConv2d":
        """A layer of conv's geometry whose parameters, on the meta device, are there to be replaced
        (no allocation, and no initialisation that would be overwritten)."""
        return cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
            dtype=conv.weight.dtype,
        )

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "DepthwiseConv2d":
        """A `DepthwiseConv2d` computing what the depthwise ``conv`` computes.

        ``conv`` must be an ``nn.Conv2d`` with ``groups == in_channels == out_channels``. The new
        layer gets copies of its weight and bias (same values, device, dtype, memory format and
        ``requires_grad``), its stride, padding, dilation and padding_mode, and its training mode.
        The original layer is left untouched.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"DepthwiseConv2d.from_conv: expected an nn.Conv2d, got {type(conv).__name__}")
        c = conv.in_channels
        if conv.groups != c or conv.out_channels != c:
            raise ValueError(
                "DepthwiseConv2d.from_conv: conv is not depthwise: expected groups == in_channels == "
                f"out_channels, got in_channels={c}, out_channels={conv.out_channels}, groups={conv.groups}"
            )
        layer = cls._shell_of(conv)
        layer.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=conv.weight.requires_grad)
        if conv.bias is not None:
            layer.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=conv.bias.requires_grad)
        layer.train(conv.training)
        return layer
