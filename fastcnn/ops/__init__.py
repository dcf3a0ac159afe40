"""Functional API: each op checks its arguments, picks a backend and dispatches."""
from .depthwise_conv2d import depthwise_conv2d

__all__ = ["depthwise_conv2d"]
