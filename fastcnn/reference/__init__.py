"""Pure-PyTorch definitions of every fastcnn op: what the tests validate against, what the
benchmarks race, and the fallback when the compiled extension is missing."""
from .depthwise_conv2d import depthwise_conv2d

__all__ = ["depthwise_conv2d"]
