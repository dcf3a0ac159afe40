"""Tests of the depthwise conv2d Triton kernels (kernels/depthwise_conv2d.py), reference
F.conv2d(groups=C).

- On CPU: the kernels run under TRITON_INTERPRET=1 in a subprocess (the variable must be set
  before triton is imported) over tests/triton_interpreted/check_depthwise_conv2d.py; they are
  compiled for an H100 (sm_90) without running, which catches what the interpreter accepts but
  the compiler does not; and the launchers are traced with fake tensors, as triton_op and
  torch.compile do.
- On a GPU (`cuda` marker): the same comparisons on MobileNet-sized layers, 7x7 and 31x31, in
  fp32/fp16/bf16, plus opcheck and a fullgraph torch.compile through a triton_op.
"""
import os
import subprocess
import sys

import pytest
import torch

from kernel_test_support import compile_sm90, needs_ptxas

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "triton_interpreted"))
import check_depthwise_conv2d as check  # noqa: E402

sys.path.pop(0)

K = check.load_kernels()
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.mark.slow
def test_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "triton_interpreted", "check_depthwise_conv2d.py")],
        cwd=check.REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.slow
def test_gradients_of_gradients_through_triton_ops_under_interpreter():
    """The registered Triton ops of both fastcnn ops (depthwise here, grid_sample beside it):
    orders 1-3 against PyTorch's (tests/triton_interpreted/check_triton_ops_higher_order.py)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "triton_interpreted", "check_triton_ops_higher_order.py")],
        cwd=os.path.join(HERE, "triton_interpreted"), env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.cuda
@needs_cuda
def test_gradients_of_gradients_through_triton_ops_on_gpu():
    sys.path.insert(0, os.path.join(HERE, "triton_interpreted"))
    try:
        import check_triton_ops_higher_order as higher_order
    finally:
        sys.path.pop(0)
    failures = higher_order.run(device="cuda", verbose=False)
    assert not failures, "\n".join(f"=== {name} ===\n{text}" for name, text in failures)


# ----------------------------------------------------------------------------------------------
# Compilation for sm_90 without a GPU




@pytest.mark.parametrize("dtype,channels_last,blocks", [
    ("fp16", True, (16, 64)),
    ("fp32", False, (256, 4)),
    ("bf16", False, (64, 16)),
])
def test_kernels_compile_for_sm90(dtype, channels_last, blocks):
    needs_ptxas()
    block_p, block_c = blocks
    pointers = {name: f"*{dtype}" for name in ("x_ptr", "w_ptr", "b_ptr", "y_ptr", "g_ptr", "gx_ptr")}
    layout = dict(CHANNELS_LAST=channels_last, ACC_F64=False, BLOCK_P=block_p, BLOCK_C=block_c)
    compile_sm90(K._depthwise_conv2d_fwd_kernel, pointers,
                  dict(KH=3, KW=3, SH=2, SW=2, HAS_BIAS=True, **layout))
    compile_sm90(K._depthwise_conv2d_grad_input_kernel, pointers, dict(KH=3, KW=5, SH=2, SW=1, **layout))
    compile_sm90(K._depthwise_conv2d_grad_weight_partial_kernel,
                  dict(pointers, pw_ptr="*fp32", pb_ptr="*fp32"),
                  dict(KW=3, SH=1, SW=1, NEED_W=True, NEED_B=True, **layout))
    compile_sm90(K._depthwise_conv2d_sum_partials_kernel, dict(part_ptr="*fp32", out_ptr=f"*{dtype}"),
                  dict(ACC_F64=False, BLOCK=256))


# ----------------------------------------------------------------------------------------------
# Tracing with fake tensors: what triton_op's generated fake and torch.compile run


def _forward_backward(x, w, b, stride, padding, dilation):
    y = K.forward(x, w, b, stride, padding, dilation)
    return (y, *K.backward(y, x, w, stride, padding, dilation, [True, True, True]))


@pytest.mark.parametrize("channels_last", [False, True])
def test_launchers_trace_with_symbolic_shapes(channels_last):
    from torch.fx.experimental.proxy_tensor import make_fx

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(2, 8, 9, 7, device="meta", memory_format=fmt)
    w, b = torch.empty(8, 1, 3, 5, device="meta"), torch.empty(8, device="meta")
    stride, padding, dilation = [2, 1], [1, 2, 2, 2], [1, 1]
    gm = make_fx(lambda *a: _forward_backward(*a, stride, padding, dilation), tracing_mode="symbolic")(x, w, b)
    launches = [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    assert len(launches) == 5  # forward, grad_input, grad_weight partials, two partial sums
    y, gx, gw, gb = _forward_backward(x, w, b, stride, padding, dilation)
    assert y.shape == (2, 8, 5, 7) and y.is_contiguous(memory_format=fmt)
    assert gx.shape == x.shape and gx.is_contiguous(memory_format=fmt)
    assert gw.shape == w.shape and gw.is_contiguous() and gb.shape == b.shape


def test_launchers_run_on_fake_cuda_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 8, 9, 9, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
        w = torch.empty(8, 1, 3, 3, device="cuda", dtype=torch.float16)
        y, gx, gw, gb = _forward_backward(x, w, None, [2, 2], [1, 1, 1, 1], [1, 1])
        assert y.device.type == "cuda" and y.dtype == torch.float16
        assert y.shape == (2, 8, 5, 5) and y.is_contiguous(memory_format=torch.channels_last)
        assert gx.stride() == x.stride() and gw.shape == w.shape and gb.shape == (8,)


# ----------------------------------------------------------------------------------------------
# GPU


def _gpu_cases():
    cases = []
    # MobileNet v1 depthwise layers (N, C, H, stride); 7x7 (ConvNeXt) and 31x31 (RepLKNet).
    layers = [(8, 32, 112, 1), (4, 64, 112, 2), (4, 256, 28, 1), (2, 512, 14, 1), (8, 1024, 7, 1)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for layout in ("nchw", "channels_last"):
            for n, c, h, s in layers:
                cases.append(check.case(f"mobilenet_{n}x{c}x{h}_s{s}_{layout}_{str(dtype)[6:]}", n=n, c=c, h=h, w=h,
                                        stride=(s, s), layout=layout, dtype=dtype))
            cases.append(check.case(f"k7_{layout}_{str(dtype)[6:]}", n=4, c=96, h=56, w=56, k=(7, 7),
                                    padding=(3, 3, 3, 3), layout=layout, dtype=dtype))
            cases.append(check.case(f"k31_{layout}_{str(dtype)[6:]}", n=2, c=64, h=28, w=28, k=(31, 31),
                                    padding=(15, 15, 15, 15), layout=layout, dtype=dtype))
    # The interpreted shapes too, and odd views at a realistic size.
    cases += [dict(spec, name="interpreted_" + spec["name"]) for spec in check.INTERPRETED_CASES]
    cases.append(check.case("sliced_cl_grad_permuted", n=4, c=96, h=29, w=31, stride=(2, 2),
                            layout="sliced_channels_last", grad="permuted", dtype=torch.float16))
    cases.append(check.case("expanded_grad", n=4, c=144, h=56, w=56, layout="channels_last", grad="expand_scalar"))
    return cases


@pytest.mark.cuda
@needs_cuda
def test_kernels_on_gpu():
    failures = check.run_cases(_gpu_cases(), device="cuda", verbose=False)
    assert not failures, "\n".join(f"=== {name} ===\n{text}" for name, text in failures)


@pytest.mark.cuda
@needs_cuda
def test_triton_op_opcheck_and_compile():
    from typing import List, Optional

    from torch import Tensor

    @torch.library.triton_op("fastcnn_test_dw::forward", mutates_args=())
    def forward(x: Tensor, w: Tensor, b: Optional[Tensor], stride: List[int], padding: List[int],
                dilation: List[int]) -> Tensor:
        return K.forward(x, w, b, stride, padding, dilation)

    @torch.library.triton_op("fastcnn_test_dw::backward", mutates_args=())
    def backward(g: Tensor, x: Tensor, w: Tensor, stride: List[int], padding: List[int], dilation: List[int],
                 output_mask: List[bool]) -> tuple[Tensor, Tensor, Tensor]:
        return K.backward(g, x, w, stride, padding, dilation, output_mask)

    args = ([2, 1], [1, 2, 0, 1], [1, 2])
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(3, 24, 17, 15, device="cuda").contiguous(memory_format=fmt)
        w, b = torch.randn(24, 1, 3, 3, device="cuda"), torch.randn(24, device="cuda")
        torch.library.opcheck(forward, (x, w, b, *args), test_utils=("test_schema", "test_faketensor"))
        y = forward(x, w, b, *args)
        torch.library.opcheck(backward, (torch.randn_like(y), x, w, *args, [True, True, True]),
                              test_utils=("test_schema", "test_faketensor"))

        def f(x, w, b):
            y = torch.ops.fastcnn_test_dw.forward(x, w, b, *args)
            return y, torch.ops.fastcnn_test_dw.backward(torch.tanh(y), x, w, *args, [True, True, True])

        eager = f(x, w, b)
        compiled = torch.compile(f, fullgraph=True)(x, w, b)
        # grad_weight sums ~400 products through fp32 atomics, in another order on each run.
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-4)
