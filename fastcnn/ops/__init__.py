"""Functional API: each op checks its arguments, picks a backend and dispatches."""
from .depthwise_conv2d import depthwise_conv2d
from .grid_sample import affine_grid_sample, grid_sample

__all__ = ["affine_grid_sample", "depthwise_conv2d", "grid_sample"]
