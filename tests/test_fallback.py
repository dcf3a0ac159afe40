"""Without the compiled extension, `import fastcnn` still works: one warning, ops fall back to the
reference, and `fastcnn.backends` says why. Runs in a subprocess where importing fastcnn._C fails."""
import subprocess
import sys

SCRIPT = r"""
import sys, warnings
sys.modules["fastcnn._C"] = None  # makes `import fastcnn._C` raise ImportError
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, fastcnn
    x, w = torch.randn(2, 3, 8, 8, requires_grad=True), torch.randn(3, 1, 3, 3)
    y = fastcnn.ops.depthwise_conv2d(x, w, None, 1, 1)
    y.sum().backward()
messages = [str(c.message) for c in caught if "fastcnn._C could not be loaded" in str(c.message)]
assert len(messages) == 1, messages
assert fastcnn.backends.available() == ["reference"] or "triton" in fastcnn.backends.available()
ok, why = fastcnn.backends.status()["cpu"]
assert not ok and "pip install --no-build-isolation -e ." in why, why
expected = torch.nn.functional.conv2d(x, w, None, 1, 1, 1, 3)
assert torch.allclose(y, expected)
assert x.grad is not None
print("fallback ok")
"""


def test_import_without_extension_falls_back_to_reference():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fallback ok" in result.stdout
