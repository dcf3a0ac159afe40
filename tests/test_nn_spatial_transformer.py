"""fastcnn.nn.AffineGridSample and SpatialTransformer against F.affine_grid + F.grid_sample: values,
gradients, output_size, identity initialisation, channels_last, lazy regressor, state_dict, errors
and repr. Runs on whichever backend fastcnn picks (auto)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcnn
from fastcnn.nn import AffineGridSample, SpatialTransformer

IDENTITY = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}
# grad_theta sums over every output pixel and channel: allow for fp32 summation order.
TOL_REDUCED = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-9, atol=1e-9)}


def random_theta(n, dtype=torch.float64, generator=None):
    """Rotation, anisotropic scale and shift around the identity, some samples reaching outside."""
    return (IDENTITY.to(dtype) + 0.4 * torch.randn(n, 2, 3, dtype=dtype, generator=generator)).to(dtype)


def reference(input, theta, size, mode, padding_mode, align_corners):
    grid = F.affine_grid(theta, list(size), align_corners=align_corners)
    return F.grid_sample(input, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


def small_localization(in_channels=1):
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(8), nn.ReLU()
    )


# (N, C, (H_in, W_in), output_size)
SHAPES = [
    (2, 3, (9, 11), None),
    (3, 1, (8, 8), (5, 7)),  # downsampling, rectangular output
    (1, 4, (6, 5), (13, 10)),  # upsampling, odd sizes
    (2, 2, (1, 1), None),  # 1x1 spatial
    (2, 5, (7, 6), 4),  # int output_size: square
]


@pytest.mark.filterwarnings("ignore:Since version 1.3.0, affine_grid behavior has changed for unit-size grids")
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[0]}x{s[1]}x{s[2][0]}x{s[2][1]}-out{s[3]}" for s in SHAPES])
def test_affine_grid_sample_matches_torch(shape, mode, padding_mode, align_corners, dtype=torch.float32):
    n, c, (h, w), output_size = shape
    layer = AffineGridSample(output_size, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    x = torch.randn(n, c, h, w, dtype=dtype)
    theta = random_theta(n, dtype)
    if output_size is None:
        out_hw = (h, w)
    else:
        out_hw = (output_size, output_size) if isinstance(output_size, int) else output_size
    size = (n, c) + tuple(out_hw)

    x_ours, t_ours = x.clone().requires_grad_(), theta.clone().requires_grad_()
    x_ref, t_ref = x.clone().requires_grad_(), theta.clone().requires_grad_()
    y_ours = layer(x_ours, t_ours)
    y_ref = reference(x_ref, t_ref, size, mode, padding_mode, align_corners)
    assert y_ours.shape == size and y_ours.dtype == dtype
    torch.testing.assert_close(y_ours, y_ref, **TOL[dtype])

    grad = torch.randn_like(y_ref)
    y_ours.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **TOL[dtype])
    torch.testing.assert_close(t_ours.grad, t_ref.grad, **TOL_REDUCED[dtype])


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
def test_gradcheck_fp64(padding_mode, align_corners):
    layer = AffineGridSample((4, 3), padding_mode=padding_mode, align_corners=align_corners)
    # Seeded: gradcheck's finite differences fail where a sample sits within eps of a kink (a pixel
    # edge, or border padding's clamp), which some draws of the global generator hit.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64, generator=g).requires_grad_()
    theta = random_theta(2, generator=g).requires_grad_()
    expected = reference(x, theta, (2, 2, 4, 3), "bilinear", padding_mode, align_corners)
    torch.testing.assert_close(layer(x, theta), expected, **TOL[torch.float64])
    assert torch.autograd.gradcheck(layer, (x, theta), fast_mode=True)


def test_forward_goes_through_fastcnn_ops(monkeypatch):
    calls = []
    original = fastcnn.ops.affine_grid_sample

    def spy(input, theta, size, *args, **kwargs):
        calls.append(tuple(size))
        return original(input, theta, size, *args, **kwargs)

    monkeypatch.setattr(fastcnn.ops, "affine_grid_sample", spy)
    AffineGridSample((3, 4))(torch.randn(2, 5, 6, 6), random_theta(2, torch.float32))
    stn = SpatialTransformer(small_localization(), localization_features=8)
    stn(torch.randn(3, 1, 10, 10))
    assert calls == [(2, 5, 3, 4), (3, 1, 10, 10)]


def test_output_size():
    x = torch.randn(2, 3, 10, 12)
    theta = IDENTITY.expand(2, 2, 3)
    assert AffineGridSample()(x, theta).shape == (2, 3, 10, 12)
    assert AffineGridSample((4, 5))(x, theta).shape == (2, 3, 4, 5)
    assert AffineGridSample([4, 5]).output_size == (4, 5)
    assert AffineGridSample(7)(x, theta).shape == (2, 3, 7, 7)
    assert AffineGridSample(torch.Size([3, 2])).output_size == (3, 2)
    # Identity at the same size samples the pixel centres: the input, up to fp32 coordinate rounding.
    torch.testing.assert_close(AffineGridSample()(x, theta), x, rtol=1e-5, atol=1e-5)
    # Batch 0.
    assert AffineGridSample((4, 5))(x[:0], theta[:0]).shape == (0, 3, 4, 5)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("lazy", [False, True], ids=["features_given", "lazy"])
def test_identity_initialisation_passes_input_through(lazy, align_corners):
    torch.manual_seed(0)
    stn = SpatialTransformer(small_localization(3), align_corners=align_corners,
                             localization_features=None if lazy else 8)
    x = torch.randn(4, 3, 11, 9)
    theta = stn.theta(x)
    assert theta.shape == (4, 2, 3)
    torch.testing.assert_close(theta, IDENTITY.expand(4, 2, 3), rtol=0, atol=0)
    torch.testing.assert_close(stn(x), x, rtol=1e-5, atol=1e-5)
    assert type(stn.fc_loc) is nn.Linear and stn.fc_loc.in_features == 8
    assert torch.equal(stn.fc_loc.weight, torch.zeros(6, 8))
    assert torch.equal(stn.fc_loc.bias, torch.tensor([1.0, 0, 0, 0, 1, 0]))
    # reset_regressor puts a trained regressor back at the identity.
    with torch.no_grad():
        stn.fc_loc.weight.normal_()
        stn.fc_loc.bias.normal_()
    stn.reset_regressor()
    torch.testing.assert_close(stn.theta(x), IDENTITY.expand(4, 2, 3), rtol=0, atol=0)


def test_forward_is_sampler_of_theta_and_gradients_reach_localization():
    torch.manual_seed(0)
    stn = SpatialTransformer(small_localization(2), output_size=(6, 7), localization_features=8)
    with torch.no_grad():  # away from the identity, so every path carries gradient
        stn.fc_loc.weight.normal_(0, 0.1)
    x = torch.randn(3, 2, 12, 12)
    y = stn(x)
    assert y.shape == (3, 2, 6, 7)
    torch.testing.assert_close(y, stn.sampler(x, stn.theta(x)), rtol=0, atol=0)
    torch.testing.assert_close(y, reference(x, stn.theta(x), (3, 2, 6, 7), "bilinear", "zeros", False),
                               rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    for name, p in stn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradients_reach_localization_from_identity_init():
    """At the identity init only fc_loc gets gradient in the first step (its weight is zero), and
    after one optimiser step the localisation network does too."""
    torch.manual_seed(0)
    stn = SpatialTransformer(small_localization(1), localization_features=8)
    x = torch.randn(4, 1, 10, 10)
    with torch.no_grad():
        stn(x)  # materialise the lazy layer before the optimiser sees the parameters
    opt = torch.optim.SGD(stn.parameters(), lr=0.1)
    target = torch.randn(4, 1, 10, 10)
    F.mse_loss(stn(x), target).backward()
    assert stn.fc_loc.weight.grad.abs().sum() > 0 and stn.fc_loc.bias.grad.abs().sum() > 0
    opt.step()
    opt.zero_grad()
    F.mse_loss(stn(x), target).backward()
    conv = stn.localization[0]
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_channels_last_input(mode):
    x = torch.randn(2, 6, 9, 8).to(memory_format=torch.channels_last)
    theta = random_theta(2, torch.float32)
    layer = AffineGridSample((7, 10), mode=mode, padding_mode="border")
    x_ours, t_ours = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(), theta.clone().requires_grad_()
    x_ref, t_ref = x.detach().contiguous().requires_grad_(), theta.clone().requires_grad_()
    y = layer(x_ours, t_ours)
    y_ref = reference(x_ref, t_ref, (2, 6, 7, 10), mode, "border", False)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    grad = torch.randn_like(y_ref)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **TOL[torch.float32])
    torch.testing.assert_close(t_ours.grad, t_ref.grad, **TOL_REDUCED[torch.float32])

    stn = SpatialTransformer(small_localization(6), localization_features=8)
    torch.testing.assert_close(stn(x), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lazy", [False, True], ids=["features_given", "lazy"])
def test_state_dict_round_trip(lazy):
    torch.manual_seed(0)
    features = None if lazy else 8

    def make():
        return SpatialTransformer(small_localization(2), output_size=(5, 5), localization_features=features)

    stn = make()
    x = torch.randn(2, 2, 10, 10)
    stn(x)  # materialise lazy layers
    with torch.no_grad():
        stn.fc_loc.weight.normal_(0, 0.1)
        stn.fc_loc.bias.add_(0.05 * torch.randn(6))
    state = stn.state_dict()
    assert {"fc_loc.weight", "fc_loc.bias"} <= state.keys()
    assert not any(k.startswith("sampler") for k in state)  # the sampler has no state

    other = make()  # lazy layers still uninitialised: load_state_dict materialises them
    other.load_state_dict(state)  # strict
    assert torch.equal(other(x), stn(x))
    clone = copy.deepcopy(stn)
    assert torch.equal(clone(x), stn(x))


def test_constructor_errors_name_the_argument():
    with pytest.raises(ValueError, match="mode must be one of 'bilinear', 'nearest', got 'bicubic'"):
        AffineGridSample(mode="bicubic")
    with pytest.raises(ValueError, match="padding_mode must be one of 'zeros', 'border', 'reflection'"):
        AffineGridSample(padding_mode="zero")
    with pytest.raises(ValueError, match="output_size"):
        AffineGridSample(output_size=(0, 4))
    with pytest.raises(ValueError, match="output_size"):
        AffineGridSample(output_size=(2, 3, 4))
    with pytest.raises(TypeError, match="align_corners"):
        AffineGridSample(align_corners=None)
    loc = small_localization()
    with pytest.raises(ValueError, match="^SpatialTransformer: mode must be"):
        SpatialTransformer(loc, mode="linear")
    with pytest.raises(ValueError, match="^SpatialTransformer: padding_mode must be"):
        SpatialTransformer(loc, padding_mode="reflect")
    with pytest.raises(ValueError, match="localization_features"):
        SpatialTransformer(loc, localization_features=0)
    with pytest.raises(TypeError, match="localization must be an nn.Module"):
        SpatialTransformer(lambda x: x)


def test_forward_errors_name_the_problem():
    layer = AffineGridSample()
    with pytest.raises(ValueError, match="theta of shape \\[N, 2, 3\\] with N = 2"):
        layer(torch.randn(2, 3, 5, 5), torch.randn(3, 2, 3))
    with pytest.raises(ValueError, match="theta of shape"):
        layer(torch.randn(2, 3, 5, 5), torch.randn(2, 3, 3))
    with pytest.raises(ValueError, match="4-D"):
        layer(torch.randn(3, 5, 5), torch.randn(3, 2, 3))


def test_repr():
    assert repr(AffineGridSample()) == (
        "AffineGridSample(output_size=None, mode='bilinear', padding_mode='zeros', align_corners=False)"
    )
    assert repr(AffineGridSample((3, 4), "nearest", "border", True)) == (
        "AffineGridSample(output_size=(3, 4), mode='nearest', padding_mode='border', align_corners=True)"
    )
    stn = SpatialTransformer(nn.Flatten(), output_size=8, localization_features=16)
    assert "(fc_loc): Linear(in_features=16, out_features=6, bias=True)" in repr(stn)
    assert "(sampler): AffineGridSample(output_size=(8, 8)" in repr(stn)
