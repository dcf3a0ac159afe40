"""Every GPU backend (the CUDA C++ kernels and the Triton ones) on the stream and the device the
caller means. Needs an NVIDIA GPU (`cuda` marker); the multi-GPU test needs two.

- CUDA graph capture: a kernel launched anywhere but the current stream (the legacy default stream,
  say) makes the capture fail, and a host synchronisation inside an op fails it too. A test that
  only runs an op on a side stream cannot see either: the results come out right regardless.
  Replaying the graph on new input values must then give what eager calls give.
- Tensors on cuda:1 while cuda:0 is current (``device_map="auto"``): the C++ kernels switch with a
  CUDAGuard, the Triton launchers with kernels/_launch.py's on_tensor_device (Triton itself launches
  on the current device).
"""
import pytest
import torch

import fastcnn

GPU_BACKENDS = ["cuda", "triton"]
OPS = ["depthwise_conv2d", "affine_grid_sample", "grid_sample"]

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]


def _needs(backend):
    ok, why = fastcnn.backends.status()[backend]
    if not ok:
        pytest.skip(f"backend {backend!r} unavailable: {why}")


def _inputs(op, device, generator):
    """(input, parameter): the two tensors each op differentiates, fp32, channels_last input for
    the depthwise convolution (its layout of choice on GPUs)."""

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    if op == "depthwise_conv2d":
        return randn(4, 48, 29, 31).to(memory_format=torch.channels_last), randn(48, 1, 3, 3)
    if op == "affine_grid_sample":
        theta = torch.tensor([[0.9, -0.2, 0.1], [0.25, 1.1, -0.05]]).repeat(4, 1, 1)
        return randn(4, 3, 40, 36), (theta + 0.05 * torch.randn(4, 2, 3, generator=generator)).to(device)
    return randn(4, 3, 40, 36), (1.2 * torch.rand(4, 24, 20, 2, generator=generator) * 2 - 1.2).to(device)


def _forward_backward(op, x, param, grad_out=None):
    if op == "depthwise_conv2d":
        y = fastcnn.ops.depthwise_conv2d(x, param, stride=2, padding=1)
    elif op == "affine_grid_sample":
        y = fastcnn.ops.affine_grid_sample(x, param, (x.shape[0], x.shape[1], 24, 20))
    else:
        y = fastcnn.ops.grid_sample(x, param)
    if grad_out is None:
        grad_out = torch.ones_like(y)
    return (y, *torch.autograd.grad(y, (x, param), grad_out))


def _close(got, expected):
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_cuda_graph_capture_and_replay(op, backend, deterministic):
    _needs(backend)
    generator = torch.Generator().manual_seed(11)
    x, param = (t.requires_grad_() for t in _inputs(op, "cuda", generator))
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        with fastcnn.use_backend(backend):
            grad_out = torch.randn_like(_forward_backward(op, x, param)[0])
            # Warm-up on a side stream (JIT compilation, allocator pools), as torch.cuda.graphs asks.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    _forward_backward(op, x, param, grad_out)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = _forward_backward(op, x, param, grad_out)
            new_x, new_param = _inputs(op, "cuda", generator)
            with torch.no_grad():
                x.copy_(new_x)
                param.copy_(new_param)
            graph.replay()
            torch.cuda.synchronize()
            _close(captured, _forward_backward(op, x, param, grad_out))
    finally:
        torch.use_deterministic_algorithms(saved)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_tensors_on_another_device_than_the_current_one(op, backend):
    _needs(backend)
    inputs = _inputs(op, "cpu", torch.Generator().manual_seed(5))
    with fastcnn.use_backend(backend), torch.cuda.device(0):
        expected = _forward_backward(op, *(t.to("cuda:0").requires_grad_() for t in inputs))
        got = _forward_backward(op, *(t.to("cuda:1").requires_grad_() for t in inputs))
        assert torch.cuda.current_device() == 0
    assert all(t.device == torch.device("cuda", 1) for t in got)
    torch.cuda.synchronize(1)
    _close([t.to("cuda:0") for t in got], expected)
