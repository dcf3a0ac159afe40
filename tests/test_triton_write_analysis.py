"""torch.compile's view of what each Triton kernel writes, without a GPU.

Under torch.compile a `triton_op` is functionalized: torch reads each kernel's Triton IR to find
the arguments it writes (torch._higher_order_ops.triton_kernel_wrap), and treats every one as
mutated. An op input wrongly found written is copied back into, which fails for a leaf that
requires grad ("a leaf Variable that requires grad is being used in an in-place operation"): the
atomic grid_sample backward did that to theta on the H200, because its tap addresses came from a
helper that was passed coord_ptr. Here every launch of every configuration is captured on CPU
tensors, analysed for sm_90, and no argument sharing memory with an op input may be written.
"""
import itertools
import os
import sys

import pytest
import torch

pytest.importorskip("triton")
kernel_wrap = pytest.importorskip("torch._higher_order_ops.triton_kernel_wrap")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_interpreted"))
import working_tree_kernels  # noqa: E402

sys.path.pop(0)

depthwise = working_tree_kernels.load("depthwise_conv2d")
grid_sample = working_tree_kernels.load("grid_sample")


def _written(kernel, kwargs):
    if hasattr(kernel_wrap, "identify_accessed_tensors"):  # torch >= 2.12
        accesses = kernel_wrap.identify_accessed_tensors(kernel, kwargs, {})
        return {dep.name for dep in accesses.read_writes.writes}
    if hasattr(kernel_wrap, "identify_mutated_tensors"):
        return set(kernel_wrap.identify_mutated_tensors(kernel, kwargs, {}))
    pytest.skip("this torch has neither identify_accessed_tensors nor identify_mutated_tensors")


@pytest.fixture
def captured_launches(monkeypatch):
    """wrap_triton(kernel)[grid](...) records (kernel, arguments by name) instead of launching;
    Triton's active driver reports an sm_90 GPU so that the IR can be generated here."""
    import triton
    from triton.backends.compiler import GPUTarget

    class Sm90Driver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

    monkeypatch.setattr(triton.runtime.driver, "_active", Sm90Driver())
    launches = []

    def wrap_triton(kernel):
        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launches.append((kernel, dict(zip(kernel.arg_names, args), **kwargs)))
                return launch
        return Launcher()

    monkeypatch.setattr(torch.library, "wrap_triton", wrap_triton)
    return launches


def _check(launches, inputs):
    assert launches
    storages = {t.untyped_storage().data_ptr() for t in inputs if t is not None and t.numel() > 0}
    for kernel, kwargs in launches:
        written = _written(kernel, kwargs)
        assert written, kernel.fn.__name__
        hit = sorted(name for name in written
                     if isinstance(kwargs[name], torch.Tensor) and kwargs[name].numel() > 0
                     and kwargs[name].untyped_storage().data_ptr() in storages)
        assert not hit, f"{kernel.fn.__name__} is seen writing op inputs through {hit}"


@pytest.mark.parametrize("affine,nearest,deterministic,channels_last",
                         list(itertools.product([True, False], repeat=4)))
def test_grid_sample_kernels_write_no_input(captured_launches, affine, nearest, deterministic, channels_last):
    x = torch.randn(2, 3, 7, 9)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    theta = torch.randn(2, 2, 3) if affine else None
    grid = None if affine else torch.rand(2, 5, 6, 2) * 2 - 1
    go = torch.randn(2, 3, 5, 6)
    interpolation = 1 if nearest else 0
    grid_sample.forward(x, grid, theta, (5, 6), interpolation, 0, False)
    grid_sample.backward(go, x, grid, theta, interpolation, 0, False, [True, True], deterministic)
    _check(captured_launches, [x, theta, grid, go])


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_depthwise_kernels_write_no_input(captured_launches, channels_last, bias):
    x = torch.randn(2, 8, 9, 10)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(8, 1, 3, 3)
    b = torch.randn(8) if bias else None
    go = torch.randn(2, 8, 5, 10)
    args = ([2, 1], [1, 1, 1, 1], [1, 1])
    depthwise.forward(x, w, b, *args)
    depthwise.backward(go, x, w, *args, [True, True, bias])
    _check(captured_launches, [x, w, b, go])
