"""fastcnn: hand-written CPU, CUDA and Triton kernels for the building blocks of modern CNNs."""
from . import _extension

_extension.load()

from . import backends, ops, reference  # noqa: E402
from . import nn, models  # noqa: E402
from .backends import use_backend  # noqa: E402

__version__ = "0.1.0"
__all__ = ["backends", "ops", "reference", "nn", "models", "use_backend"]
