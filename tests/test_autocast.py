"""torch.autocast with fastcnn's ops, layers and models: each op is cast as PyTorch casts the op it
replaces (depthwise_conv2d as conv2d, the samplers as grid_sampler), so a model that trains under
autocast with torchvision layers trains with fastcnn's (fastcnn/ops/_autocast.py)."""
import pytest
import torch
import torch.nn.functional as F

import fastcnn
from fastcnn.ops import _autocast, affine_grid_sample, depthwise_conv2d, grid_sample

LOWER = [torch.bfloat16, torch.float16]
LAYOUTS = [torch.contiguous_format, torch.channels_last]


def _leaf(t):
    return t.detach().clone().requires_grad_()


@pytest.mark.parametrize("dtype", LOWER, ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
def test_depthwise_is_cast_as_conv2d(dtype, layout):
    """fp32 input and parameters in: the op runs in the autocast dtype, exactly as on inputs cast
    by hand, like F.conv2d under autocast; the gradients reach the fp32 leaves as fp32."""
    torch.manual_seed(0)
    x = _leaf(torch.randn(2, 6, 9, 11).to(memory_format=layout))
    w, b = _leaf(torch.randn(6, 1, 3, 3)), _leaf(torch.randn(6))
    with torch.autocast("cpu", dtype=dtype):
        ours = depthwise_conv2d(x, w, b, stride=2, padding=1)
        stock = F.conv2d(x, w, b, stride=2, padding=1, groups=6)
    assert ours.dtype == stock.dtype == dtype
    assert ours.is_contiguous(memory_format=layout)
    grad = torch.randn(ours.shape, dtype=dtype)
    ours_grads = torch.autograd.grad(ours, (x, w, b), grad)
    assert [g.dtype for g in ours_grads] == [torch.float32] * 3

    x_c, w_c, b_c = (_leaf(t.detach().to(dtype)) for t in (x, w, b))
    by_hand = depthwise_conv2d(x_c, w_c, b_c, stride=2, padding=1)
    torch.testing.assert_close(ours, by_hand, rtol=0, atol=0)
    for a, e in zip(ours_grads, torch.autograd.grad(by_hand, (x_c, w_c, b_c), grad)):
        torch.testing.assert_close(a, e.float(), rtol=0, atol=0)


def test_mixed_dtypes_are_rejected_outside_autocast_only():
    x, w = torch.randn(1, 4, 5, 5).bfloat16(), torch.randn(4, 1, 3, 3)
    with pytest.raises(TypeError, match="weight has dtype torch.float32 but input has torch.bfloat16"):
        depthwise_conv2d(x, w, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert depthwise_conv2d(x, w, padding=1).dtype == torch.bfloat16
    theta = torch.eye(2, 3)[None]
    with pytest.raises(TypeError, match="theta has dtype torch.float32 but input has torch.bfloat16"):
        affine_grid_sample(x, theta, (1, 4, 3, 3))


def test_the_ops_themselves_are_cast_and_float64_is_not():
    """The rule sits on the dispatcher: a direct torch.ops call is cast too; fp64 never is."""
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3)
    args = ([1, 1], [1, 1, 1, 1], [1, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.ops.fastcnn.depthwise_conv2d(x, w, None, *args).dtype == torch.bfloat16
        assert torch.ops.fastcnn.depthwise_conv2d(x.double(), w.double(), None, *args).dtype == torch.float64
        theta = torch.eye(2, 3)[None].bfloat16()
        assert torch.ops.fastcnn.affine_grid_sample(x.bfloat16(), theta, [3, 3], 0, 0, False).dtype == torch.float32


@pytest.mark.parametrize("dtype", LOWER, ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
def test_samplers_run_in_float32_on_the_cpu_as_grid_sampler(dtype, layout):
    """On the CPU PyTorch's grid_sampler runs in fp32 under autocast whatever comes in; so do ours,
    on the same values as fp32 inputs cast by hand; the gradients keep their leaves' dtypes."""
    torch.manual_seed(0)
    x = _leaf(torch.randn(3, 2, 8, 9).to(dtype).to(memory_format=layout))
    theta = _leaf(torch.eye(2, 3).repeat(3, 1, 1) + 0.2 * torch.randn(3, 2, 3))
    grid = _leaf((torch.rand(3, 5, 7, 2) * 2.2 - 1.1).to(dtype))
    size = (3, 2, 5, 7)
    with torch.autocast("cpu", dtype=dtype):
        fused = affine_grid_sample(x, theta, size)
        sampled = grid_sample(x, grid)
        stock = F.grid_sample(x, grid, align_corners=False)
    assert fused.dtype == sampled.dtype == stock.dtype == torch.float32
    torch.testing.assert_close(fused, affine_grid_sample(x.float(), theta, size), rtol=0, atol=0)
    torch.testing.assert_close(sampled, grid_sample(x.float(), grid.float()), rtol=0, atol=0)
    torch.testing.assert_close(sampled, stock, rtol=1e-5, atol=1e-5)
    (fused.sum() + sampled.sum()).backward()
    assert x.grad.dtype == grid.grad.dtype == dtype and theta.grad.dtype == torch.float32


def test_promote_rule_takes_the_widest_input():
    """The CUDA samplers' rule (grid_sampler's there), checked on its own with CPU tensors."""
    half, full = torch.ones(1, dtype=torch.bfloat16), torch.ones(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _autocast._target_dtype("promote", (half, half, 0), "cpu") == torch.bfloat16
        assert _autocast._target_dtype("promote", (half, full), "cpu") == torch.float32
        assert _autocast._target_dtype("promote", (half, full.double()), "cpu") == torch.bfloat16
        assert _autocast._cast((half, full.double(), 3), torch.float32, "cpu")[1].dtype == torch.float64


@pytest.mark.parametrize("model_name", ["mobilenet_v1", "stn_classifier"])
def test_models_train_under_autocast_as_with_stock_layers(model_name):
    """One training step's forward and backward under bf16 autocast, fastcnn's layers against the
    same model on the stock ops (the reference backend), both measured against the step in fp32:
    the same output dtype, every parameter gradient fp32, and errors within twice the stock
    model's (the error rule of the half-precision tests). The STN's own error is the smaller:
    its coordinates come from theta in fp32, where F.affine_grid rounds the grid to bf16."""
    torch.manual_seed(0)
    if model_name == "mobilenet_v1":
        model, x = fastcnn.models.mobilenet_v1(width_mult=0.25, num_classes=10), torch.randn(2, 3, 64, 64)
    else:
        model, x = fastcnn.models.stn_classifier(), torch.rand(4, 1, 28, 28)
    results = {}
    for name, backend, dtype in (("ours", "auto", torch.bfloat16), ("stock", "reference", torch.bfloat16),
                                 ("fp32", "reference", None)):
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks in every run
        with fastcnn.use_backend(backend), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=bool(dtype)):
            out = model(x)
        out.float().logsumexp(1).sum().backward()
        results[name] = [out] + [p.grad.clone() for p in model.parameters()]
    assert results["ours"][0].dtype == results["stock"][0].dtype == torch.bfloat16
    for i, (ours, stock, truth) in enumerate(zip(results["ours"], results["stock"], results["fp32"])):
        assert i == 0 or (ours.dtype == torch.float32 and torch.isfinite(ours).all())
        our_error = (ours.float() - truth).abs().max().item()
        stock_error = (stock.float() - truth).abs().max().item()
        assert our_error <= 2 * stock_error + 1e-3 * truth.abs().max().item(), (i, our_error, stock_error)


def test_compile_traces_the_autocast_rule():
    torch._dynamo.reset()
    x, w = torch.randn(2, 4, 7, 7), _leaf(torch.randn(4, 1, 3, 3))

    def f(x, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return depthwise_conv2d(x, w, padding=1)

    compiled = torch.compile(f, fullgraph=True)
    out, expected = compiled(x, w), f(x, w)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(out.float().sum(), w)
    assert grad.dtype == torch.float32


@pytest.mark.cuda
def test_cuda_rules():
    """CUDA autocast (fp16): depthwise in fp16 as conv2d; the samplers promote as grid_sampler."""
    x, w = torch.randn(2, 4, 9, 9, device="cuda"), torch.randn(4, 1, 3, 3, device="cuda")
    theta = torch.eye(2, 3, device="cuda")[None].repeat(2, 1, 1)
    with torch.autocast("cuda", dtype=torch.float16):
        assert depthwise_conv2d(x, w, padding=1).dtype == torch.float16
        assert affine_grid_sample(x.half(), theta.half(), (2, 4, 5, 5)).dtype == torch.float16
        assert affine_grid_sample(x.half(), theta, (2, 4, 5, 5)).dtype == torch.float32
        grid = F.affine_grid(theta, (2, 4, 5, 5), align_corners=False)
        assert grid_sample(x.half(), grid).dtype == F.grid_sample(x.half(), grid, align_corners=False).dtype
