"""fastcnn.nn.DepthwiseConv2d against nn.Conv2d(C, C, k, groups=C): values, gradients, state_dict,
initialisation, from_conv, errors and repr. Runs on whichever backend fastcnn picks (auto)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcnn
from fastcnn.nn import DepthwiseConv2d

CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")],
)

# (C, kernel_size, stride, padding, dilation, bias, padding_mode, (H, W))
CONFIGS = [
    (8, 3, 1, 1, 1, True, "zeros", (9, 9)),
    (5, 3, 2, 1, 1, False, "zeros", (11, 10)),  # stride 2, odd input, C not a multiple of a vector width
    (17, 3, 1, "same", 1, True, "zeros", (7, 9)),
    (6, 4, 1, "same", 1, True, "zeros", (8, 7)),  # even kernel: the extra pad goes bottom/right
    (4, 3, 1, "valid", 2, True, "zeros", (9, 8)),
    (12, (3, 5), (2, 1), (1, 2), (2, 1), True, "zeros", (13, 11)),  # rectangular everything
    (3, 5, 1, 4, 1, False, "zeros", (6, 6)),  # padding larger than the kernel's half
    (7, 3, 1, 0, 1, True, "zeros", (3, 3)),  # 1x1 output
    (9, 3, 2, 1, 1, True, "reflect", (10, 9)),
    (5, 3, 1, 2, 1, False, "circular", (8, 8)),
    (6, (3, 1), 1, (1, 0), 1, True, "replicate", (7, 5)),
]
IDS = [f"c{c[0]}-k{c[1]}-s{c[2]}-p{c[3]}-d{c[4]}-{'b' if c[5] else 'nob'}-{c[6]}" for c in CONFIGS]

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}
# Weight and bias gradients reduce over N*H*W terms: allow for fp32 summation order.
TOL_REDUCED = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def _pair_of_layers(c, k, stride, padding, dilation, bias, padding_mode, device="cpu", dtype=torch.float32):
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, bias=bias, padding_mode=padding_mode)
    ref = nn.Conv2d(c, c, k, groups=c, device=device, dtype=dtype, **kwargs)
    ours = DepthwiseConv2d(c, c, k, device=device, dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_matches_conv2d_forward_backward(config, channels_last, dtype, device):
    c, k, stride, padding, dilation, bias, padding_mode, (h, w) = config
    ours, ref = _pair_of_layers(c, k, stride, padding, dilation, bias, padding_mode, device, dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, c, h, w, device=device, dtype=dtype).to(memory_format=fmt)
    x_ours = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    x_ref = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()

    y_ours, y_ref = ours(x_ours), ref(x_ref)
    assert y_ours.shape == y_ref.shape
    assert y_ours.dtype == dtype and y_ours.device == x.device
    torch.testing.assert_close(y_ours, y_ref, **TOL[dtype])
    if channels_last and padding_mode == "zeros":
        assert y_ours.is_contiguous(memory_format=torch.channels_last)

    grad = torch.randn_like(y_ref)
    y_ours.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **TOL[dtype])
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **TOL_REDUCED[dtype])
    if bias:
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, **TOL_REDUCED[dtype])
    else:
        assert ours.bias is None


@pytest.mark.parametrize("make_grad", ["sum", "expanded", "permuted"])
def test_backward_with_strided_grad_output(make_grad):
    """grad_output with zero strides (y.sum()), expanded, or permuted must not be read as contiguous."""
    ours, ref = _pair_of_layers(6, 3, 1, 1, 1, True, "zeros")
    x = torch.randn(2, 6, 7, 8)
    expanded = torch.randn(1, 6, 1, 8)
    permuted = torch.randn(2, 8, 7, 6)
    grads = []
    for layer in (ours, ref):
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        y = layer(xi)
        if make_grad == "sum":
            y.sum().backward()
        elif make_grad == "expanded":
            y.backward(expanded.expand_as(y))
        else:
            y.backward(permuted.permute(0, 3, 2, 1))
        grads.append((xi.grad, layer.weight.grad, layer.bias.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_forward_goes_through_fastcnn_op(monkeypatch):
    import fastcnn.nn.depthwise_conv2d as module

    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return fastcnn.ops.depthwise_conv2d(*args, **kwargs)

    monkeypatch.setattr(module, "_depthwise_conv2d", spy)
    layer = DepthwiseConv2d(4, 4, 3, padding=1)
    layer(torch.randn(1, 4, 5, 5))
    assert len(calls) == 1


def test_reference_backend_is_exact():
    ours, ref = _pair_of_layers(8, 3, 2, 1, 1, True, "zeros")
    x = torch.randn(2, 8, 9, 9)
    with fastcnn.use_backend("reference"):
        y = ours(x)
    assert torch.equal(y, ref(x))


def test_is_a_conv2d_and_has_conv2d_parameters():
    layer = DepthwiseConv2d(16, 16, (3, 5), stride=2, padding=(1, 2))
    assert isinstance(layer, nn.Conv2d)
    assert layer.groups == 16 and layer.in_channels == layer.out_channels == 16
    assert layer.kernel_size == (3, 5) and layer.stride == (2, 2) and layer.padding == (1, 2)
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]
    assert layer.weight.shape == (16, 1, 3, 5) and layer.bias.shape == (16,)
    assert "bias" not in dict(DepthwiseConv2d(4, 4, 3, bias=False).named_parameters())


@pytest.mark.parametrize("kwargs", [dict(), dict(bias=False), dict(groups=12)])
@pytest.mark.parametrize("kernel_size", [3, (5, 2)])
def test_same_initialisation_as_conv2d(kernel_size, kwargs):
    torch.manual_seed(1234)
    ours = DepthwiseConv2d(12, 12, kernel_size, **kwargs)
    torch.manual_seed(1234)
    ref = nn.Conv2d(12, 12, kernel_size, **{"groups": 12, **kwargs})
    assert torch.equal(ours.weight, ref.weight)
    if ref.bias is not None:
        assert torch.equal(ours.bias, ref.bias)
    # reset_parameters draws the same way too.
    torch.manual_seed(99)
    ours.reset_parameters()
    torch.manual_seed(99)
    ref.reset_parameters()
    assert torch.equal(ours.weight, ref.weight)


def test_factory_kwargs():
    layer = DepthwiseConv2d(4, 4, 3, dtype=torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.bias.dtype == torch.float64
    meta = DepthwiseConv2d(4, 4, 3, device="meta")
    assert meta.weight.is_meta


@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_both_ways(bias):
    x = torch.randn(2, 10, 8, 8)
    ref = nn.Conv2d(10, 10, 3, padding=1, groups=10, bias=bias)
    ours = DepthwiseConv2d(10, 10, 3, padding=1, bias=bias)
    assert ours.state_dict().keys() == ref.state_dict().keys()

    ours.load_state_dict(ref.state_dict())  # strict
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)

    ours2 = DepthwiseConv2d(10, 10, 3, padding=1, bias=bias)
    ref2 = nn.Conv2d(10, 10, 3, padding=1, groups=10, bias=bias)
    ref2.load_state_dict(ours2.state_dict())  # strict
    torch.testing.assert_close(ours2(x), ref2(x), rtol=1e-5, atol=1e-5)

    # Inside a model: a checkpoint of a stock-PyTorch model loads into the fastcnn one and back.
    model_ref = nn.Sequential(nn.Conv2d(3, 10, 1), nn.Conv2d(10, 10, 3, groups=10, bias=bias))
    model_ours = nn.Sequential(nn.Conv2d(3, 10, 1), DepthwiseConv2d(10, 10, 3, bias=bias))
    model_ours.load_state_dict(model_ref.state_dict())
    model_ref.load_state_dict(model_ours.state_dict())
    x3 = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(model_ours(x3), model_ref(x3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_from_conv(bias):
    conv = nn.Conv2d(6, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=6, bias=bias,
                     padding_mode="reflect", dtype=torch.float64)
    conv.weight.requires_grad_(False)
    conv.eval()
    layer = DepthwiseConv2d.from_conv(conv)
    assert type(layer) is DepthwiseConv2d
    assert not layer.training
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(layer, attr) == getattr(conv, attr), attr
    assert layer.weight.dtype == torch.float64 and layer.weight.device == conv.weight.device
    assert torch.equal(layer.weight, conv.weight) and not layer.weight.requires_grad
    if bias:
        assert torch.equal(layer.bias, conv.bias) and layer.bias.requires_grad
    else:
        assert layer.bias is None
    # A copy, not an alias.
    assert layer.weight.data_ptr() != conv.weight.data_ptr()
    with torch.no_grad():
        layer.weight.add_(1)
    assert not torch.equal(layer.weight, conv.weight)
    with torch.no_grad():
        layer.weight.sub_(1)
    x = torch.randn(2, 6, 9, 10, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-10, atol=1e-12)


def test_from_conv_keeps_training_mode_and_memory_format():
    conv = nn.Conv2d(4, 4, 3, groups=4).to(memory_format=torch.channels_last)
    layer = DepthwiseConv2d.from_conv(conv)
    assert layer.training
    assert layer.weight.stride() == conv.weight.stride()


def test_from_conv_errors():
    with pytest.raises(ValueError, match="not depthwise"):
        DepthwiseConv2d.from_conv(nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="not depthwise"):
        DepthwiseConv2d.from_conv(nn.Conv2d(4, 8, 3, groups=4))  # channel multiplier 2
    with pytest.raises(TypeError, match="nn.Conv2d"):
        DepthwiseConv2d.from_conv(nn.Conv1d(4, 4, 3, groups=4))


def test_constructor_errors():
    with pytest.raises(ValueError, match="out_channels must equal in_channels"):
        DepthwiseConv2d(4, 8, 3)
    with pytest.raises(ValueError, match="groups must equal in_channels"):
        DepthwiseConv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="groups must equal in_channels"):
        DepthwiseConv2d(4, 4, 3, groups=1)
    with pytest.raises(ValueError, match="in_channels must be a positive int"):
        DepthwiseConv2d(0, 0, 3)
    with pytest.raises(ValueError, match="padding_mode"):
        DepthwiseConv2d(4, 4, 3, padding_mode="mirror")
    with pytest.raises(ValueError, match="strided"):
        DepthwiseConv2d(4, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding string"):
        DepthwiseConv2d(4, 4, 3, padding="full")


def test_forward_errors_name_the_problem():
    layer = DepthwiseConv2d(4, 4, 3)
    with pytest.raises(ValueError, match="weight of shape"):
        layer(torch.randn(1, 5, 8, 8))  # wrong channel count
    with pytest.raises(ValueError, match="4-D"):
        layer(torch.randn(4, 8, 8))
    with pytest.raises(ValueError, match="smaller than"):
        layer(torch.randn(1, 4, 2, 2))


def test_repr_matches_conv2d():
    for kwargs in [dict(), dict(stride=2, padding=1, bias=False), dict(padding="same", dilation=2),
                   dict(padding=1, padding_mode="circular")]:
        ours = DepthwiseConv2d(32, 32, 3, **kwargs)
        ref = nn.Conv2d(32, 32, 3, groups=32, **kwargs)
        assert repr(ours) == "Depthwise" + repr(ref)
    assert repr(DepthwiseConv2d(32, 32, 3, stride=2, padding=1, bias=False)) == (
        "DepthwiseConv2d(32, 32, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), groups=32, bias=False)"
    )


def test_deepcopy_and_pickle_roundtrip(tmp_path):
    layer = DepthwiseConv2d(4, 4, 3, padding=1)
    clone = copy.deepcopy(layer)
    path = tmp_path / "layer.pt"
    torch.save(layer, path)
    loaded = torch.load(path, weights_only=False)
    x = torch.randn(1, 4, 6, 6)
    for other in (clone, loaded):
        assert type(other) is DepthwiseConv2d
        assert torch.equal(other(x), layer(x))


def test_functional_equivalent_of_stock_conv():
    """The layer's output equals F.conv2d(groups=C) called directly (no Conv2d involved)."""
    layer = DepthwiseConv2d(5, 5, 3, stride=2, padding=1)
    x = torch.randn(3, 5, 11, 11)
    expected = F.conv2d(x, layer.weight, layer.bias, 2, 1, 1, 5)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
