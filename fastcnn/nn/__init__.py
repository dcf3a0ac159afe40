"""Drop-in layers built on fastcnn.ops."""
from .conversion import convert
from .depthwise_conv2d import DepthwiseConv2d
from .spatial_transformer import AffineGridSample, SpatialTransformer

__all__ = ["AffineGridSample", "DepthwiseConv2d", "SpatialTransformer", "convert"]
