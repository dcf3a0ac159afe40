import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip on machines without a GPU (each file may also skip on its own)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
