"""Drop-in layers built on fastcnn.ops."""
from .depthwise_conv2d import DepthwiseConv2d

__all__ = ["DepthwiseConv2d"]
