"""Model definitions built from fastcnn.nn."""
from .mobilenet import MobileNetV1, mobilenet_v1
from .stn import plain_cnn_classifier, stn_classifier

__all__ = ["MobileNetV1", "mobilenet_v1", "plain_cnn_classifier", "stn_classifier"]
