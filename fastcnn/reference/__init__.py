"""Pure-PyTorch definitions of every fastcnn op: what the tests validate against, what the
benchmarks race, and the fallback when the compiled extension is missing."""
from .depthwise_conv2d import depthwise_conv2d
from .grid_sample import affine_grid_sample, grid_sample

__all__ = ["affine_grid_sample", "depthwise_conv2d", "grid_sample"]
