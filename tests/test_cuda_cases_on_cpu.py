"""The numerical cases of the CUDA test files, run on the CPU kernels.

The CUDA files hold the widest sweeps of shapes, dtypes and layouts in the project (fp16/bf16
everywhere, odd geometries, every gradient against fp64), and no GPU has run them yet. Run here
they check the CPU kernels the same way: they found a segfault and a wrong bias gradient in the
fp16/bf16 depthwise backward. Each test is the CUDA file's own function with its parameters,
its module's DEVICE set to "cpu" for the call. Left out: what is CUDA's alone (streams, device
errors, the cuda backend, opcheck/compile of the CUDA ops) or differs on the CPU by design
(PyTorch's CPU grid_sample returns NaN for a NaN coordinate; our CPU coordinate gradient differs
in the last bits with and without grad_input).
"""
import inspect

import pytest

import fastcnn
import test_depthwise_conv2d_cuda as depthwise_cuda
import test_grid_sample_cuda as grid_sample_cuda

pytestmark = pytest.mark.skipif(not fastcnn._extension.has_ops(), reason="fastcnn._C is not built")


def _on_cpu(module, name):
    case = getattr(module, name)

    def test(monkeypatch, **params):
        monkeypatch.setattr(module, "DEVICE", "cpu")
        case(**params)

    parameters = [inspect.Parameter("monkeypatch", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    parameters += list(inspect.signature(case).parameters.values())
    test.__signature__ = inspect.Signature(parameters)
    test.__name__ = test.__qualname__ = f"test_{module.__name__[5:]}_{name[5:]}"
    test.__doc__ = case.__doc__
    test.pytestmark = [m for m in getattr(case, "pytestmark", []) if m.name == "parametrize"]
    return test


DEPTHWISE = [
    "test_mobilenet_v1_layers", "test_kernel_sizes", "test_shapes", "test_without_bias", "test_grad_output_strides",
    "test_output_mask", "test_deterministic", "test_batch_zero", "test_non_contiguous_input",
    "test_channels_last_unaligned_storage",
]
GRID_SAMPLE = [
    "test_fp32_all_modes", "test_fp64", "test_half_precision", "test_shapes", "test_stn_224",
    "test_theta_sampling_outside", "test_identity_theta", "test_nonfinite_coordinates_other_paddings",
    "test_grad_output_strides", "test_deterministic", "test_batch_zero", "test_empty_channels_and_output",
    "test_non_contiguous_inputs", "test_channels_last_unaligned_storage",
]
for _module, _names in ((depthwise_cuda, DEPTHWISE), (grid_sample_cuda, GRID_SAMPLE)):
    for _name in _names:
        _test = _on_cpu(_module, _name)
        globals()[_test.__name__] = _test
