"""fastcnn.models.stn_classifier and plain_cnn_classifier: shapes, parameter counts, the identity
start of the transformer, one training step, and a smoke run of examples/stn_digits.py."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastcnn.models import plain_cnn_classifier, stn_classifier
from fastcnn.models.stn import SmallCNN, STNClassifier
from fastcnn.nn import SpatialTransformer

ROOT = Path(__file__).resolve().parents[1]


def parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "num_classes, in_channels, input_size", [(10, 1, 28), (7, 3, 32), (5, 2, (30, 36))]
)
def test_shapes(num_classes, in_channels, input_size):
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    x = torch.rand(3, in_channels, h, w)
    stn = stn_classifier(num_classes, in_channels, input_size)
    plain = plain_cnn_classifier(num_classes, in_channels, input_size)
    assert isinstance(stn, STNClassifier) and isinstance(stn.stn, SpatialTransformer)
    assert isinstance(plain, SmallCNN)
    assert stn(x).shape == plain(x).shape == (3, num_classes)
    assert stn.stn(x).shape == x.shape
    assert stn.stn.theta(x).shape == (3, 2, 3)


def test_output_size_sets_the_classifier_input():
    model = stn_classifier(input_size=40, output_size=28)
    x = torch.rand(2, 1, 40, 40)
    assert model.stn(x).shape == (2, 1, 28, 28)
    assert model(x).shape == (2, 10)
    assert model.classifier.input_size == (28, 28)


def test_parameter_counts_are_comparable():
    stn, plain = stn_classifier(), plain_cnn_classifier()
    n_stn, n_plain = parameters(stn), parameters(plain)
    assert (n_stn, n_plain) == (27_360, 27_296)  # the figures in the module docstring
    for kwargs in (dict(), dict(num_classes=5, in_channels=3, input_size=32)):
        a, b = parameters(stn_classifier(**kwargs)), parameters(plain_cnn_classifier(**kwargs))
        assert abs(a - b) <= 0.25 * max(a, b), (kwargs, a, b)


def test_transformer_starts_at_identity():
    torch.manual_seed(0)
    model = stn_classifier()
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(model.stn(x), x, rtol=1e-5, atol=1e-5)
    model.eval()
    torch.testing.assert_close(model(x), model.classifier(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", [stn_classifier, plain_cnn_classifier])
def test_one_training_step_decreases_the_loss(build):
    torch.manual_seed(0)
    model = build(dropout=0.0)
    x = torch.rand(32, 1, 28, 28)
    y = torch.randint(0, 10, (32,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = F.cross_entropy(model(x), y)
    before.backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if not name.startswith("stn.localization"))
    opt.step()
    with torch.no_grad():
        after = F.cross_entropy(model(x), y)
    assert after < before


def test_errors():
    with pytest.raises(ValueError, match="too small"):
        stn_classifier(input_size=12)
    with pytest.raises(ValueError, match="input_size"):
        plain_cnn_classifier(input_size=(28, 0))
    with pytest.raises(ValueError, match="channels"):
        plain_cnn_classifier(channels=(8, 16, 32))


def test_example_smoke_run(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "stn.png"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "stn_digits.py"), "--quick", "--threads", "1", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "STN classifier test accuracy: " in proc.stdout, proc.stdout
    assert "plain CNN test accuracy: " in proc.stdout, proc.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
