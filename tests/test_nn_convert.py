"""fastcnn.nn.convert: every depthwise nn.Conv2d of a model becomes a DepthwiseConv2d sharing its
parameters; everything else stays; the model computes what it computed."""
import copy

import pytest
import torch
from torch import nn

import fastcnn
from fastcnn.nn import DepthwiseConv2d, convert
from fastcnn.nn.conversion import convertible


class OwnConv(nn.Conv2d):
    """A subclass whose forward may differ: convert leaves it alone."""


def _model():
    torch.manual_seed(0)
    shared = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),                                    # dense
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),                # depthwise, bias, stride 2
        nn.ModuleDict({
            "same": nn.Conv2d(8, 8, 5, padding="same", dilation=2, groups=8, bias=False),
            "reflect": nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect"),
        }),
        nn.ModuleList([shared, nn.ReLU(), shared]),                       # one layer, two places
        nn.Conv2d(8, 8, 3, padding=1, groups=2),                          # grouped, not depthwise
        nn.Conv2d(8, 16, 3, padding=1, groups=8),                         # channel multiplier 2
        OwnConv(16, 16, 3, padding=1, groups=16),
    )


def _run(model, x):
    y = x
    for layer in model:
        if isinstance(layer, nn.ModuleDict):
            y = layer["reflect"](layer["same"](y))
        elif isinstance(layer, nn.ModuleList):
            for sub in layer:
                y = sub(y)
        else:
            y = layer(y)
    return y


def test_converts_the_depthwise_layers_and_only_them():
    model = _model()
    original = copy.deepcopy(model)
    params = [id(p) for p in model.parameters()]
    converted = convert(model)
    assert converted is model
    kinds = [type(m) for m in (model[0], model[1], model[2]["same"], model[2]["reflect"], model[3][0], model[4],
                               model[5], model[6])]
    assert kinds == [nn.Conv2d, DepthwiseConv2d, DepthwiseConv2d, DepthwiseConv2d, DepthwiseConv2d, nn.Conv2d,
                     nn.Conv2d, OwnConv]
    assert model[3][0] is model[3][2]
    # The same Parameter objects, state_dict keys and values: checkpoints load both ways.
    assert [id(p) for p in model.parameters()] == params
    assert list(model.state_dict()) == list(original.state_dict())
    original.load_state_dict(model.state_dict())
    model.load_state_dict(original.state_dict())
    for new, old in zip(model.modules(), original.modules()):
        if isinstance(new, DepthwiseConv2d):
            assert (new.stride, new.padding, new.dilation, new.padding_mode) == (
                old.stride, old.padding, old.dilation, old.padding_mode)
    assert convert(model) is model and sum(isinstance(m, DepthwiseConv2d) for m in model.modules()) == 4


def test_converted_model_computes_the_same_forward_and_backward():
    model = _model()
    original = copy.deepcopy(model)
    convert(model)
    x = torch.randn(2, 3, 17, 19)
    y, y_ref = _run(model, x), _run(original, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    for (name, p), p_ref in zip(model.named_parameters(), original.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_optimizer_built_before_the_conversion_still_trains_the_layers():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    convert(model)
    before = model[1].weight.detach().clone()
    _run(model, torch.randn(2, 3, 9, 9)).square().sum().backward()
    optimizer.step()
    assert isinstance(model[1], DepthwiseConv2d)
    assert not torch.equal(model[1].weight, before)


def test_module_itself_and_training_mode_and_hooks_carry_over():
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4).eval()
    seen = []
    conv.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    conv.register_full_backward_hook(lambda module, grad_input, grad_output: seen.append("backward"))
    layer = convert(conv)
    assert isinstance(layer, DepthwiseConv2d) and layer.weight is conv.weight and layer.bias is conv.bias
    assert not layer.training
    layer(torch.randn(1, 4, 5, 5, requires_grad=True)).sum().backward()
    assert seen == [torch.Size([1, 4, 5, 5]), "backward"]


def test_verbose_names_the_layers(capsys):
    convert(_model(), verbose=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"fastcnn.nn.convert: {name} -> DepthwiseConv2d" for name in ("1", "2.same", "2.reflect", "3.0",
                                                                               "3.2")]


def test_leaves_parametrised_weights_alone():
    """Weight normalisation (either API) recomputes the weight from other parameters: such a layer
    is not converted (the new layer could not hold the recomputed weight as its Parameter)."""
    parametrized = nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 4, 3, padding=1, groups=4))
    with pytest.warns(FutureWarning):
        hooked = nn.utils.weight_norm(nn.Conv2d(4, 4, 3, padding=1, groups=4))
    model = nn.Sequential(parametrized, hooked, nn.Conv2d(4, 4, 3, padding=1, groups=4))
    x = torch.randn(1, 4, 6, 6)
    expected = model(x)
    convert(model)
    assert model[0] is parametrized and model[1] is hooked and isinstance(model[2], DepthwiseConv2d)
    torch.testing.assert_close(model(x), expected)


def test_rejects_what_is_not_a_module():
    with pytest.raises(TypeError, match="expected an nn.Module, got Tensor"):
        convert(torch.zeros(1))


@pytest.mark.parametrize("name, depthwise", [("mobilenet_v3_small", 11), ("mnasnet0_5", 17)])
def test_torchvision_models(name, depthwise):
    """torchvision's depthwise models (3x3 and 5x5, strides 1 and 2): all their depthwise layers
    converted, the same forward and gradients (eval mode: dropout would draw different masks)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    original = copy.deepcopy(model)
    convert(model)
    assert sum(isinstance(m, DepthwiseConv2d) for m in model.modules()) == depthwise
    assert not any(convertible(m) for m in model.modules())
    x = torch.randn(2, 3, 64, 64)
    y, y_ref = model(x), original(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for (pname, p), p_ref in zip(model.named_parameters(), original.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-3, atol=1e-4, msg=pname)
