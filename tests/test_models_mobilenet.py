"""fastcnn.models.mobilenet_v1 against the MobileNets paper (Howard et al. 2017, Tables 1, 6, 7) and
against the same network with stock nn.Conv2d(groups=C) depthwise layers."""
import copy

import pytest
import torch
from torch import nn

from fastcnn.models import MobileNetV1, mobilenet_v1
from fastcnn.models.mobilenet import count_mult_adds
from fastcnn.nn import DepthwiseConv2d


def trainable_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def with_stock_depthwise(model):
    """A deep copy of `model` whose DepthwiseConv2d layers are nn.Conv2d(groups=C), same weights."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DepthwiseConv2d):
                conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                 child.padding, child.dilation, child.groups, child.bias is not None,
                                 child.padding_mode, device=child.weight.device, dtype=child.weight.dtype)
                conv.load_state_dict(child.state_dict())
                setattr(parent, name, conv)
    assert not any(isinstance(m, DepthwiseConv2d) for m in model.modules())
    return model


def randomize_batchnorm(model, generator):
    """Running statistics and affine parameters away from 0/1, so eval mode checks something."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=generator))
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=generator))


def assert_close_scaled(actual, expected, rtol=1e-4):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


# ---------------------------------------------------------------------------------------------
# Architecture and the paper's figures


@pytest.mark.parametrize("width_mult, expected", [(1.0, 4_231_976), (0.5, 1_331_592)])
def test_parameter_count_matches_paper(width_mult, expected):
    model = mobilenet_v1(width_mult=width_mult, num_classes=1000)
    # Trainable parameters: conv weights, BN gamma/beta, FC weight and bias (the paper's 4.2M / 1.3M,
    # exactly Keras' "trainable params"). BN running mean/var are buffers and do not count.
    assert trainable_parameters(model) == expected
    bn_affine = sum(m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    running = sum(b.numel() for name, b in model.named_buffers() if not name.endswith("num_batches_tracked"))
    assert running == bn_affine  # 21,888 at alpha 1.0: Keras' "non-trainable params"
    if width_mult == 1.0:
        assert running == 21_888
        assert expected - bn_affine == 4_210_088  # convs + FC alone


def test_architecture_follows_table_1():
    model = mobilenet_v1()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [m for m in convs if isinstance(m, DepthwiseConv2d)]
    assert len(convs) == 27 and len(depthwise) == 13  # 28 layers counting the FC
    assert all(m.bias is None for m in convs)
    assert not any(isinstance(m, nn.ReLU6) for m in model.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 27
    stem = convs[0]
    assert (stem.in_channels, stem.out_channels, stem.kernel_size, stem.stride) == (3, 32, (3, 3), (2, 2))
    table = [(32, 1, 64), (64, 2, 128), (128, 1, 128), (128, 2, 256), (256, 1, 256), (256, 2, 512)] + [
        (512, 1, 512)
    ] * 5 + [(512, 2, 1024), (1024, 1, 1024)]
    for block, (c_in, stride, c_out) in zip(model.features[1:], table):
        dw, pw = block.dw_conv, block.pw_conv
        assert isinstance(dw, DepthwiseConv2d)
        assert (dw.in_channels, dw.kernel_size, dw.stride, dw.padding) == (c_in, (3, 3), (stride,) * 2, (1, 1))
        assert (pw.in_channels, pw.out_channels, pw.kernel_size, pw.groups) == (c_in, c_out, (1, 1), 1)
    assert (model.fc.in_features, model.fc.out_features) == (1024, 1000)


def test_width_multiplier_scales_every_channel_count():
    model = mobilenet_v1(width_mult=0.25, num_classes=10)
    channels = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    full = [m.out_channels for m in mobilenet_v1().modules() if isinstance(m, nn.Conv2d)]
    assert channels == [int(c * 0.25) for c in full]
    assert model.fc.in_features == 256 and model.fc.out_features == 10


def test_mult_adds_match_paper():
    model = mobilenet_v1(width_mult=1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mult_adds = count_mult_adds(model, 224)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert count_mult_adds(model, (224, 224)) == mult_adds
    assert abs(mult_adds - 569e6) <= 0.005 * 569e6, mult_adds
    assert mult_adds == 568_740_352
    # Table 6 (width) and Table 7 (resolution): 149M at alpha 0.5, 186M at 128x128.
    assert abs(count_mult_adds(mobilenet_v1(width_mult=0.5)) - 149e6) <= 0.005 * 149e6
    small = mobilenet_v1(resolution_mult=0.571)
    assert abs(count_mult_adds(small) - 186e6) <= 0.005 * 186e6  # default input_size: 128


def test_resolution_multiplier_sets_input_size():
    assert mobilenet_v1().input_size == 224
    assert [mobilenet_v1(resolution_mult=r).input_size for r in (0.857, 0.714, 0.571)] == [192, 160, 128]


# ---------------------------------------------------------------------------------------------
# Running it


@pytest.mark.parametrize("resolution_mult", [1.0, 0.571])
def test_forward_shape(resolution_mult):
    model = mobilenet_v1(width_mult=0.25, resolution_mult=resolution_mult).eval()
    size = model.input_size
    assert size == {1.0: 224, 0.571: 128}[resolution_mult]
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, size, size))
        out = model.fc(torch.flatten(model.avgpool(features), 1))
    assert features.shape == (1, 256, size // 32, size // 32)
    assert out.shape == (1, 1000)
    assert torch.isfinite(out).all()


def test_eval_output_equals_stock_depthwise_model():
    g = torch.Generator().manual_seed(0)
    model = mobilenet_v1(width_mult=0.25, num_classes=100)
    randomize_batchnorm(model, g)
    model.eval()
    stock = with_stock_depthwise(model).eval()
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        assert_close_scaled(model(x), stock(x))


def test_train_step_equals_stock_depthwise_model():
    """Train mode (batch statistics, running-stat updates) forward and backward: every gradient and
    every running statistic agrees with the stock model. In fp64: BatchNorm's gamma gradients are
    sums of large cancelling terms, which would amplify fp32 summation-order noise."""
    g = torch.Generator().manual_seed(1)
    model = mobilenet_v1(width_mult=0.25, num_classes=10).double()
    stock = with_stock_depthwise(model)
    x = torch.randn(3, 3, 48, 48, generator=g, dtype=torch.float64)
    target = torch.randint(0, 10, (3,), generator=g)
    results = []
    for m in (model, stock):
        m.train()
        xi = x.clone().requires_grad_()
        loss = nn.functional.cross_entropy(m(xi), target)
        loss.backward()
        results.append((loss.detach(), xi.grad))
    tol = dict(rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(results[0][0], results[1][0], **tol)
    torch.testing.assert_close(results[0][1], results[1][1], **tol)
    params, stock_params = dict(model.named_parameters()), dict(stock.named_parameters())
    assert params.keys() == stock_params.keys()
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, stock_params[name].grad, **tol, msg=lambda m: f"{name}: {m}")
    buffers, stock_buffers = dict(model.named_buffers()), dict(stock.named_buffers())
    assert buffers.keys() == stock_buffers.keys()
    for name, b in buffers.items():
        torch.testing.assert_close(b, stock_buffers[name], **tol)
    assert int(buffers["features.13.dw_bn.num_batches_tracked"]) == 1


def test_input_gradient_penalty_equals_stock_depthwise_model():
    """An R1-style penalty (the input gradient's norm, differentiated into the weights): gradients of
    gradients through every depthwise layer, against the stock model's, in fp64 (see above)."""
    g = torch.Generator().manual_seed(2)
    model = mobilenet_v1(width_mult=0.25, num_classes=1).double()
    stock = with_stock_depthwise(model)
    x = torch.randn(2, 3, 48, 48, generator=g, dtype=torch.float64)
    for m in (model, stock):
        real = x.clone().requires_grad_()
        score = m(real).sum()
        (grad_real,) = torch.autograd.grad(score, real, create_graph=True)
        (grad_real.pow(2).sum() - score).backward()
    stock_params = dict(stock.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, stock_params[name].grad, rtol=1e-7, atol=1e-9,
                                   msg=lambda m: f"{name}: {m}")


def test_backward_reaches_every_parameter():
    model = mobilenet_v1(width_mult=0.25, num_classes=10, dropout=0.2)
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_channels_last_model():
    g = torch.Generator().manual_seed(2)
    model = mobilenet_v1(width_mult=0.25, num_classes=10)
    randomize_batchnorm(model, g)
    model.eval()
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32, generator=g)
    x_cl = x.to(memory_format=torch.channels_last).requires_grad_()
    features_cl = model_cl.forward_features(x_cl)
    assert features_cl.is_contiguous(memory_format=torch.channels_last)
    out_cl = model_cl(x_cl)
    with torch.no_grad():
        assert_close_scaled(out_cl, model(x))
    out_cl.sum().backward()
    assert torch.isfinite(x_cl.grad).all()
    for name, p in model_cl.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_state_dict_loads_into_stock_model_and_back():
    model = mobilenet_v1(width_mult=0.25, num_classes=10)
    stock = with_stock_depthwise(mobilenet_v1(width_mult=0.25, num_classes=10))
    stock.load_state_dict(model.state_dict())
    model.load_state_dict(stock.state_dict())


def test_constructor_errors():
    with pytest.raises(ValueError, match="width_mult"):
        MobileNetV1(width_mult=0)
    with pytest.raises(ValueError, match="resolution_mult"):
        MobileNetV1(resolution_mult=-1.0)


def test_repr_mentions_depthwise_layers():
    text = repr(mobilenet_v1(width_mult=0.25))
    assert "DepthwiseConv2d(8, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), groups=8, bias=False)" in text
    assert "input_size=224" in text
