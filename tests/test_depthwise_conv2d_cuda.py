"""CUDA kernels of fastcnn::depthwise_conv2d and fastcnn::_depthwise_conv2d_backward.

The reference is stock PyTorch: F.conv2d(F.pad(x, (left, right, top, bottom)), w, b, stride, 0,
dilation, groups=C) and its autograd gradients. The truth is that reference evaluated in float64
on the values actually fed to the kernels; a result passes when its error against the truth is at
most twice PyTorch's own error in the same dtype, plus a small floor relative to the truth's size.

Every test here needs an NVIDIA GPU and skips without one.
"""
import pytest
import torch
import torch.nn.functional as F

from kernel_test_support import ERROR_FLOOR as FLOOR, LAYOUTS, cuda_kernel_marks
import fastcnn  # noqa: F401  (loads fastcnn._C, which registers the ops)


pytestmark = cuda_kernel_marks("fastcnn::depthwise_conv2d")

DEVICE = "cuda"


@pytest.fixture(autouse=True)
def _exact_fp32_reference():
    # The fp32 yardstick must be true fp32, not TF32.
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def reference(x, w, b, stride, padding, dilation):
    top, bottom, left, right = padding
    return F.conv2d(F.pad(x, (left, right, top, bottom)), w, b, stride, 0, dilation, groups=x.shape[1])


def reference_grads(x, w, b, grad_out, stride, padding, dilation):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    inputs = [x, w]
    if b is not None:
        b = b.detach().requires_grad_()
        inputs.append(b)
    y = reference(x, w, b, stride, padding, dilation)
    grads = torch.autograd.grad(y, inputs, grad_out)
    return y.detach(), grads


def ours(x, w, b, stride, padding, dilation):
    return torch.ops.fastcnn.depthwise_conv2d(x, w, b, list(stride), list(padding), list(dilation))


def ours_backward(grad_out, x, w, stride, padding, dilation, mask=(True, True, True)):
    return torch.ops.fastcnn._depthwise_conv2d_backward(
        grad_out, x, w, list(stride), list(padding), list(dilation), list(mask)
    )


def out_size(n, k, s, p0, p1, d):
    return (n + p0 + p1 - d * (k - 1) - 1) // s + 1


def poison_allocator(*shapes, dtype):
    """Best effort: leave NaN-filled blocks of the outputs' sizes in the caching allocator, so that an
    output element the kernel forgets to write shows up as NaN."""
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device=DEVICE) for shape in shapes]
    del blocks


def randn(*shape, dtype, memory_format=torch.contiguous_format):
    t = torch.randn(*shape, dtype=torch.float64, device=DEVICE).to(dtype)
    return t.contiguous(memory_format=memory_format)


def assert_matches(name, got, torch_same_dtype, truth):
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    assert got.dtype == torch_same_dtype.dtype, f"{name}: dtype {got.dtype} != {torch_same_dtype.dtype}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an element left unwritten?)"
    if truth.numel() == 0:
        return
    err = (got.double() - truth).abs().max().item()
    torch_err = (torch_same_dtype.double() - truth).abs().max().item()
    scale = truth.abs().max().item()
    bound = 2 * torch_err + FLOOR[got.dtype] * scale
    assert err <= bound, (
        f"{name}: max error {err:.3e} against the fp64 truth exceeds {bound:.3e} "
        f"(PyTorch's own error in {got.dtype}: {torch_err:.3e}, max |truth| {scale:.3e})"
    )


def run_case(
    N, C, H, W, kH, kW, stride=(1, 1), padding=None, dilation=(1, 1), dtype=torch.float32,
    layout="nchw", bias=True, grad_out_kind="dense",
):
    if padding is None:
        padding = (kH // 2, kH // 2, kW // 2, kW // 2)
    fmt = LAYOUTS[layout]
    x = randn(N, C, H, W, dtype=dtype, memory_format=fmt)
    w = randn(C, 1, kH, kW, dtype=dtype)
    b = randn(C, dtype=dtype) if bias else None
    Ho = out_size(H, kH, stride[0], padding[0], padding[1], dilation[0])
    Wo = out_size(W, kW, stride[1], padding[2], padding[3], dilation[1])
    if grad_out_kind == "dense":
        go = randn(N, C, Ho, Wo, dtype=dtype, memory_format=fmt)
    elif grad_out_kind == "expanded":  # zero strides, as from y.sum().backward()
        go = randn(1, C, 1, 1, dtype=dtype).expand(N, C, Ho, Wo)
    elif grad_out_kind == "other_layout":
        other = torch.contiguous_format if fmt == torch.channels_last else torch.channels_last
        go = randn(N, C, Ho, Wo, dtype=dtype, memory_format=other)
    else:
        raise ValueError(grad_out_kind)

    b64 = b.double() if b is not None else None
    y64, g64 = reference_grads(x.double(), w.double(), b64, go.double(), stride, padding, dilation)
    y_t, g_t = reference_grads(x, w, b, go, stride, padding, dilation)

    poison_allocator((N, C, Ho, Wo), dtype=dtype)
    y = ours(x, w, b, stride, padding, dilation)
    assert y.is_contiguous(memory_format=fmt), "output must follow the input's memory format"
    assert_matches("output", y, y_t, y64)

    poison_allocator(tuple(x.shape), tuple(w.shape), (C,), dtype=dtype)
    gx, gw, gb = ours_backward(go, x, w, stride, padding, dilation, (True, True, bias))
    assert gx.is_contiguous(memory_format=fmt), "grad_input must follow the input's memory format"
    assert_matches("grad_input", gx, g_t[0], g64[0])
    assert_matches("grad_weight", gw, g_t[1], g64[1])
    if bias:
        assert_matches("grad_bias", gb, g_t[2], g64[2])
    else:
        assert gb.numel() == 0


# MobileNet v1 (224x224 input) depthwise layers: (C, H=W, stride), all 3x3 with padding 1.
MOBILENET_V1 = [
    (32, 112, 1), (64, 112, 2), (128, 56, 1), (128, 56, 2), (256, 28, 1),
    (256, 28, 2), (512, 14, 1), (512, 14, 2), (1024, 7, 1),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C,HW,s", MOBILENET_V1, ids=[f"c{c}_{h}x{h}_s{s}" for c, h, s in MOBILENET_V1])
def test_mobilenet_v1_layers(C, HW, s, dtype, layout):
    torch.manual_seed(C * 1000 + HW * 10 + s)
    run_case(2, C, HW, HW, 3, 3, stride=(s, s), dtype=dtype, layout=layout)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("k", [3, 5, 7, 31])
def test_kernel_sizes(k, dtype, layout):
    torch.manual_seed(k)
    H, W = (40, 37) if k == 31 else (23, 29)
    run_case(2, 24, H, W, k, k, dtype=dtype, layout=layout)


# (N, C, H, W, kH, kW, stride, padding [t, b, l, r], dilation)
SHAPES = {
    "stride2_odd_input": (2, 17, 15, 17, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1)),
    "stride2_5x5_odd": (2, 16, 19, 21, 5, 5, (2, 2), (2, 2, 2, 2), (1, 1)),
    "stride2_7x7_no_pad": (2, 8, 21, 20, 7, 7, (2, 2), (0, 0, 0, 0), (1, 1)),
    "stride3": (2, 16, 20, 22, 3, 3, (3, 3), (1, 1, 1, 1), (1, 1)),
    "stride_2x1": (2, 16, 20, 22, 3, 3, (2, 1), (1, 1, 1, 1), (1, 1)),
    "dilation2": (2, 16, 20, 22, 3, 3, (1, 1), (2, 2, 2, 2), (2, 2)),
    "dilation2_stride2": (2, 16, 21, 22, 3, 3, (2, 2), (2, 2, 2, 2), (2, 2)),
    "dilation_2x3": (2, 8, 20, 22, 3, 3, (1, 1), (1, 3, 2, 1), (2, 3)),
    "asymmetric_padding": (2, 16, 20, 22, 3, 3, (1, 1), (0, 2, 1, 3), (1, 1)),
    "same_even_kernel": (2, 16, 20, 22, 4, 4, (1, 1), (1, 2, 1, 2), (1, 1)),
    "padding_larger_than_half": (2, 16, 9, 11, 3, 3, (1, 1), (4, 3, 5, 2), (1, 1)),
    "padding_larger_than_kernel_stride2": (2, 16, 9, 11, 3, 3, (2, 2), (4, 3, 5, 2), (1, 1)),
    "rectangular_3x5": (2, 16, 20, 22, 3, 5, (1, 1), (1, 1, 2, 2), (1, 1)),
    "rectangular_5x3_stride2": (2, 16, 21, 20, 5, 3, (2, 2), (2, 2, 1, 1), (1, 1)),
    "channels_17": (2, 17, 20, 22, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    "channels_1": (3, 1, 20, 22, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    "one_by_one_spatial": (2, 40, 1, 1, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    "kernel_1x1": (2, 40, 9, 7, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1)),
    "width_smaller_than_row_vector": (2, 8, 9, 2, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    "batch_1": (1, 32, 20, 22, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("name", list(SHAPES))
def test_shapes(name, dtype, layout):
    N, C, H, W, kH, kW, stride, padding, dilation = SHAPES[name]
    torch.manual_seed(len(name))
    run_case(N, C, H, W, kH, kW, stride, padding, dilation, dtype=dtype, layout=layout)


# The channels_last forward kernel dw_fwd_cl_rows (FASTCNN_CUDA_DEPTHWISE_CL=rows; emulated on the
# CPU in test_cuda_emulation.py): 3x3/5x5, stride 1 or 2, C % 4 == 0. It also computes the stride-1
# grad_input. Cases it declines (C = 17, 7x7, stride 3) check the fallback under the same setting.
CL_ROWS_CASES = {f"mbv1_c{c}_{h}x{h}_s{s}": (2, c, h, h, 3, 3, (s, s), None, (1, 1)) for c, h, s in MOBILENET_V1}
CL_ROWS_CASES.update({name: SHAPES[name] for name in (
    "stride2_odd_input", "stride2_5x5_odd", "stride3", "asymmetric_padding", "padding_larger_than_half",
    "padding_larger_than_kernel_stride2", "channels_17", "one_by_one_spatial", "width_smaller_than_row_vector",
    "batch_1", "stride2_7x7_no_pad",
)})
CL_ROWS_CASES["k5_odd"] = (3, 12, 23, 29, 5, 5, (1, 1), (2, 2, 2, 2), (1, 1))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("name", list(CL_ROWS_CASES))
def test_channels_last_rows_kernel(name, dtype, monkeypatch):
    monkeypatch.setenv("FASTCNN_CUDA_DEPTHWISE_CL", "rows")
    N, C, H, W, kH, kW, stride, padding, dilation = CL_ROWS_CASES[name]
    torch.manual_seed(len(name) + 100)
    run_case(N, C, H, W, kH, kW, stride, padding, dilation, dtype=dtype, layout="channels_last")


# The NCHW forward kernel dw_fwd_nchw_vec (FASTCNN_CUDA_DEPTHWISE_NCHW=vec; emulated on the CPU in
# test_cuda_emulation.py): 3x3/5x5/7x7, stride 1 or 2, left padding k // 2, widths that are
# multiples of 4 (2 in fp64). It also computes the stride-1 grad_input. The 14x14 and 7x7 layers,
# stride 3 and asymmetric padding check the fallback under the same setting.
NCHW_VEC_CASES = dict(CL_ROWS_CASES)
NCHW_VEC_CASES["k7_28x32"] = (2, 6, 28, 32, 7, 7, (1, 1), (3, 3, 3, 3), (1, 1))
NCHW_VEC_CASES["k7_stride2"] = (2, 6, 27, 32, 7, 7, (2, 2), (3, 2, 3, 3), (1, 1))
NCHW_VEC_CASES["k5_top0"] = (2, 5, 19, 24, 5, 5, (1, 1), (0, 4, 2, 2), (1, 1))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("name", list(NCHW_VEC_CASES))
def test_nchw_vec_kernel(name, dtype, monkeypatch):
    monkeypatch.setenv("FASTCNN_CUDA_DEPTHWISE_NCHW", "vec")
    N, C, H, W, kH, kW, stride, padding, dilation = NCHW_VEC_CASES[name]
    torch.manual_seed(len(name) + 200)
    run_case(N, C, H, W, kH, kW, stride, padding, dilation, dtype=dtype, layout="nchw")


@pytest.mark.parametrize("offset", [1, 4], ids=["misaligned", "8_byte_aligned"])
def test_channels_last_rows_kernel_storage_offset(offset, monkeypatch):
    # fp16 at an 8-byte (not 16-byte) boundary: the rows kernel takes it (8-byte loads of 4
    # channels), the general kernel falls back to scalar loads; at 2 bytes both decline.
    monkeypatch.setenv("FASTCNN_CUDA_DEPTHWISE_CL", "rows")
    torch.manual_seed(8)
    N, C, H, W = 2, 32, 12, 13
    storage = randn(N * C * H * W + offset, dtype=torch.float16)
    x = storage[offset:].as_strided((N, C, H, W), (H * W * C, 1, W * C, C))
    assert x.is_contiguous(memory_format=torch.channels_last)
    w = randn(C, 1, 3, 3, dtype=torch.float16)
    b = randn(C, dtype=torch.float16)
    args = ((1, 1), (1, 1, 1, 1), (1, 1))
    y = ours(x, w, b, *args)
    truth = reference(x.double(), w.double(), b.double(), *args)
    assert_matches("output", y, reference(x, w, b, *args), truth)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_without_bias(layout):
    torch.manual_seed(1)
    run_case(2, 32, 20, 22, 3, 3, dtype=torch.float32, layout=layout, bias=False)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["expanded", "other_layout"])
@pytest.mark.parametrize("stride", [(1, 1), (2, 2)])
def test_grad_output_strides(kind, stride, layout):
    torch.manual_seed(2)
    run_case(2, 32, 21, 22, 3, 3, stride=stride, dtype=torch.float32, layout=layout, grad_out_kind=kind)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_output_mask(layout):
    torch.manual_seed(3)
    fmt = LAYOUTS[layout]
    x = randn(2, 16, 12, 13, dtype=torch.float32, memory_format=fmt)
    w = randn(16, 1, 3, 3, dtype=torch.float32)
    go = randn(2, 16, 12, 13, dtype=torch.float32, memory_format=fmt)
    args = ((1, 1), (1, 1, 1, 1), (1, 1))
    full = ours_backward(go, x, w, *args)
    for mask in [(True, False, False), (False, True, False), (False, False, True), (False, True, True),
                 (False, False, False)]:
        got = ours_backward(go, x, w, *args, mask=mask)
        for i, wanted in enumerate(mask):
            if wanted:
                assert torch.equal(got[i], full[i]), (mask, i)
            else:
                assert got[i].numel() == 0, (mask, i)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (5, 1), (4, 1), (31, 1)])
def test_deterministic(k, stride, layout):
    torch.manual_seed(4)
    fmt = LAYOUTS[layout]
    x = randn(2, 32, 56, 57, dtype=torch.float32, memory_format=fmt)
    w = randn(32, 1, k, k, dtype=torch.float32)
    b = randn(32, dtype=torch.float32)
    args = ((stride, stride), (k // 2,) * 4, (1, 1))
    y1, y2 = ours(x, w, b, *args), ours(x, w, b, *args)
    assert torch.equal(y1, y2)
    go = randn(*y1.shape, dtype=torch.float32, memory_format=fmt)
    first = ours_backward(go, x, w, *args)
    second = ours_backward(go, x, w, *args)
    for a, c in zip(first, second):
        assert torch.equal(a, c), "two backward runs must be bitwise equal"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_batch_zero(layout):
    fmt = LAYOUTS[layout]
    x = torch.randn(0, 16, 10, 11, device=DEVICE).contiguous(memory_format=fmt)
    w = torch.randn(16, 1, 3, 3, device=DEVICE)
    b = torch.randn(16, device=DEVICE)
    args = ((2, 2), (1, 1, 1, 1), (1, 1))
    y = ours(x, w, b, *args)
    assert y.shape == (0, 16, 5, 6)
    go = torch.randn(0, 16, 5, 6, device=DEVICE)
    poison_allocator((16, 1, 3, 3), (16,), dtype=torch.float32)
    gx, gw, gb = ours_backward(go, x, w, *args)
    assert gx.shape == x.shape
    assert gw.shape == w.shape and torch.equal(gw, torch.zeros_like(gw))
    assert gb.shape == (16,) and torch.equal(gb, torch.zeros_like(gb))


def test_non_contiguous_input():
    torch.manual_seed(5)
    base = randn(2, 16, 20, 44, dtype=torch.float32)
    x = base[..., ::2]  # stride 2 along W: neither layout
    w = randn(16, 1, 3, 3, dtype=torch.float32)
    b = randn(16, dtype=torch.float32)
    args = ((1, 1), (1, 1, 1, 1), (1, 1))
    y = ours(x, w, b, *args)
    torch.testing.assert_close(y, ours(x.contiguous(), w, b, *args), rtol=0, atol=0)
    torch.testing.assert_close(y.double(), reference(x.double(), w.double(), b.double(), *args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_channels_last_unaligned_storage(dtype):
    # A channels_last tensor whose data does not start on a 16-byte boundary: the vectorised
    # channel loads must fall back to scalar ones.
    torch.manual_seed(6)
    N, C, H, W = 2, 32, 12, 13
    storage = randn(N * C * H * W + 1, dtype=dtype)
    x = storage[1:].as_strided((N, C, H, W), (H * W * C, 1, W * C, C))
    assert x.is_contiguous(memory_format=torch.channels_last) and x.data_ptr() % 16 != 0
    w = randn(C, 1, 3, 3, dtype=dtype)
    b = randn(C, dtype=dtype)
    args = ((1, 1), (1, 1, 1, 1), (1, 1))
    y = ours(x, w, b, *args)
    aligned = x.clone(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ours(aligned, w, b, *args), rtol=0, atol=0)
    go = randn(*y.shape, dtype=dtype, memory_format=torch.channels_last)
    for a, c in zip(ours_backward(go, x, w, *args), ours_backward(go, aligned, w, *args)):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_current_stream():
    torch.manual_seed(7)
    x = randn(2, 64, 56, 56, dtype=torch.float32)
    w = randn(64, 1, 3, 3, dtype=torch.float32)
    args = ((1, 1), (1, 1, 1, 1), (1, 1))
    expected = ours(x, w, None, *args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = ours(x, w, None, *args)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(y, expected)


def test_errors():
    x = torch.randn(2, 8, 10, 10, device=DEVICE)
    w = torch.randn(8, 1, 3, 3, device=DEVICE)
    ok = ((1, 1), (1, 1, 1, 1), (1, 1))
    with pytest.raises(RuntimeError, match="weight"):
        ours(x, w.cpu(), None, *ok)
    with pytest.raises(RuntimeError, match="dtype"):
        ours(x, w.double(), None, *ok)
    with pytest.raises(RuntimeError, match=r"weight of shape \[C, 1, kH, kW\]"):
        ours(x, torch.randn(4, 1, 3, 3, device=DEVICE), None, *ok)
    with pytest.raises(RuntimeError, match="bias"):
        ours(x, w, torch.randn(7, device=DEVICE), *ok)
    with pytest.raises(RuntimeError, match="4-D"):
        ours(x[0], w, None, *ok)
    with pytest.raises(RuntimeError, match="padding"):
        ours(x, w, None, (1, 1), (-1, 1, 1, 1), (1, 1))
    with pytest.raises(RuntimeError, match="stride"):
        ours(x, w, None, (0, 1), (1, 1, 1, 1), (1, 1))
    with pytest.raises(RuntimeError, match="dilation"):
        ours(x, w, None, (1, 1), (1, 1, 1, 1), (1, 0))
    with pytest.raises(RuntimeError, match="smaller than the dilated kernel"):
        ours(x, torch.randn(8, 1, 13, 3, device=DEVICE), None, (1, 1), (0, 0, 0, 0), (1, 1))
    with pytest.raises(RuntimeError, match="grad_output"):
        ours_backward(torch.randn(2, 8, 9, 10, device=DEVICE), x, w, *ok)
    with pytest.raises(RuntimeError, match="float32, float64, float16 or bfloat16"):
        ours(x.int(), w.int(), None, *ok)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_64bit_indexing(layout):
    # More than 2^30 elements: the kernels switch to 64-bit index arithmetic. fp16 data, checked
    # against PyTorch in fp32.
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs a GPU with at least 40 GiB")
    torch.manual_seed(8)
    fmt = LAYOUTS[layout]
    x = torch.randn(1, 8, 11600, 11600, device=DEVICE, dtype=torch.float16).contiguous(memory_format=fmt)
    assert x.numel() > 2**30
    w = torch.randn(8, 1, 3, 3, device=DEVICE, dtype=torch.float16)
    b = torch.randn(8, device=DEVICE, dtype=torch.float16)
    args = ((2, 2), (1, 1, 1, 1), (1, 1))  # stride 2: the gather grad_input kernel
    y = ours(x, w, b, *args)
    go = torch.randn(y.shape, device=DEVICE, dtype=torch.float16).contiguous(memory_format=fmt)
    gx, gw, gb = ours_backward(go, x, w, *args)
    y32, (gx32, gw32, gb32) = reference_grads(x.float(), w.float(), b.float(), go.float(), *args)
    torch.testing.assert_close(y.float(), y32, rtol=2e-3, atol=2e-3)
    del y, y32
    torch.testing.assert_close(gx.float(), gx32, rtol=2e-3, atol=2e-3)
    del gx, gx32
    # sums of ~3.4e7 products: compare relative to the largest entry
    for got, want in ((gw, gw32), (gb, gb32)):
        assert (got.float() - want).abs().max() <= 2e-3 * want.abs().max()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gradients_of_gradients(layout):
    """Orders 1-3 in fp64 through the backward op's autograd (written with the two ops, so the
    CUDA kernels compute every order) against F.conv2d's."""
    torch.manual_seed(5)
    fmt = LAYOUTS[layout]
    x = randn(2, 24, 13, 12, dtype=torch.float64, memory_format=fmt).requires_grad_()
    w = randn(24, 1, 3, 3, dtype=torch.float64).requires_grad_()
    b = randn(24, dtype=torch.float64).requires_grad_()
    args = ((2, 1), (1, 2, 0, 1), (1, 2))

    def orders(f):
        first = torch.autograd.grad(f(x, w, b).pow(2).sum(), (x, w, b), create_graph=True)
        second = torch.autograd.grad(sum((g * g).sum() for g in first), (x, w, b), create_graph=True)
        return first + second + torch.autograd.grad(sum((g * g).sum() for g in second), (x, w, b))

    with fastcnn.use_backend("cuda"):
        got = orders(lambda x, w, b: fastcnn.ops.depthwise_conv2d(x, w, b, *args))
    expected = orders(lambda x, w, b: reference(x, w, b, *args))
    for index, (a, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10 * e.abs().max().item(), msg=f"gradient {index}")


def test_torch_func_per_sample_gradients_and_hessian():
    """torch.func on the CUDA kernels (fastcnn/ops/_depthwise_functorch.py): per-sample weight
    gradients (vmap of grad) and a weight Hessian, fp64, against the same transforms of F.conv2d."""
    torch.manual_seed(6)
    x = randn(6, 16, 11, 10, dtype=torch.float64, memory_format=torch.channels_last)
    w, b = randn(16, 1, 3, 3, dtype=torch.float64), randn(16, dtype=torch.float64)
    args = ((2, 1), (1, 1, 0, 2), (1, 1))

    def transforms(op):
        loss = lambda w, b, x: op(x, w, b, *args).tanh().sum()  # noqa: E731
        per_sample = torch.func.vmap(torch.func.grad(lambda w, b, xi: loss(w, b, xi[None]), argnums=(0, 1)),
                                     in_dims=(None, None, 0))(w, b, x)
        return (*per_sample, torch.func.hessian(loss)(w, b, x[:2]))

    with fastcnn.use_backend("cuda"):
        got = transforms(fastcnn.ops.depthwise_conv2d)
    expected = transforms(reference)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10 * e.abs().max().item())
