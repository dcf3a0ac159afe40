"""Model definitions built from fastcnn.nn."""
from .mobilenet import MobileNetV1, mobilenet_v1

__all__ = ["MobileNetV1", "mobilenet_v1"]
