"""The whole-model benchmark cases (fastcnn.bench_cases.models): the models it builds, the function
the providers time, and a run through the benchmark driver on small inputs."""
import pytest
import torch

import fastcnn
from fastcnn import bench_cases, benchmarking
from fastcnn.bench_cases import models
from fastcnn.models.mobilenet import count_mult_adds


def test_cases_and_registration():
    assert bench_cases.get("models") is models and models.OP == "models"
    mobilenets = ["mobilenet_v1"] + (["tv_mobilenet_v2", "tv_mobilenet_v3_large"] if models._has_torchvision() else [])
    assert [(s.name, s.n, s.label) for s in models.shapes()] == [
        (name, n, f"{n}x3x224x224") for name in mobilenets for n in (1, 8)] + [("stn_mnist", 64, "64x1x28x28")]
    assert [(s.name, s.n) for s in models.shapes(quick=True)] == [(name, 1) for name in mobilenets] + [("stn_mnist", 64)]
    assert [(s.name, s.n) for s in models.shapes(batches=[2])] == [(name, 2) for name in mobilenets] + [("stn_mnist", 64)]
    names = [p.name for p in models.providers(torch.device("cpu"))]
    assert names[-1] == benchmarking.BASELINE and "fastcnn[cpu]" in names


def test_models_are_built_once_from_one_seed_in_eval_mode_with_calibrated_statistics():
    a = models._model("mobilenet_v1", torch.float32, torch.device("cpu"), False)
    assert models._model("mobilenet_v1", torch.float32, torch.device("cpu"), False) is a
    b = models._model("mobilenet_v1", torch.float64, torch.device("cpu"), True)
    assert not a.training and not b.training
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p.double() if p.is_floating_point() else p, q), name
    # Calibrated BatchNorm: the logits keep a useful scale (uncalibrated, about 1e-25).
    logits = models.run(torch.randn(2, 3, 64, 64), "mobilenet_v1")
    assert 1e-3 < float(logits.std()) < 1e3
    stn = models._model("stn_mnist", torch.float32, torch.device("cpu"), False)
    theta = stn.stn.theta(torch.zeros(1, 1, 28, 28))
    assert not torch.allclose(theta, torch.eye(2, 3).unsqueeze(0), atol=0.05)  # not the identity


@pytest.mark.parametrize("channels_last", [False, True])
def test_run_is_inference_without_grad_and_a_training_step_with(channels_last):
    x = torch.randn(3, 1, 28, 28)
    if channels_last:  # .to(): .contiguous(memory_format=) keeps a one-channel tensor's NCHW strides
        x = x.to(memory_format=torch.channels_last)
    model = models._model("stn_mnist", torch.float32, torch.device("cpu"), channels_last)
    out = models.run(x, "stn_mnist")
    assert not out.requires_grad and all(p.grad is None for p in model.parameters())
    grads = []
    for _ in range(2):  # the second call starts from no gradients, as zero_grad() leaves them
        xg = x.detach().requires_grad_(True)
        models.run(xg, "stn_mnist").backward(torch.ones(3, 10))
        grads.append([p.grad.clone() for p in model.parameters()])
    for first, second in zip(*grads):
        torch.testing.assert_close(second, first)
    assert models._channels_last(x) == channels_last  # one channel: told apart by the stride


def test_cost_counts_the_models_multiply_adds():
    shape = models.Shape("mobilenet_v1", 2, 3, 224, 224)
    macs = count_mult_adds(models._model("mobilenet_v1", torch.float32, torch.device("cpu"), False), 224)
    assert 560e6 < macs < 580e6  # the paper's 569 M
    assert models.cost(shape, "forward", 4) == (2 * 3 * 224 * 224 * 4, 2 * 2 * macs)
    assert models.cost(shape, "forward+backward", 4)[1] == 3 * 2 * 2 * macs
    with pytest.raises(ValueError):
        models.cost(shape, "backward", 4)


@pytest.mark.parametrize("name, depthwise, five_by_five", [("tv_mobilenet_v2", 17, 0), ("tv_mobilenet_v3_large", 15, 6)])
def test_torchvision_mobilenets_run_converted(name, depthwise, five_by_five):
    pytest.importorskip("torchvision")
    model = models._model(name, torch.float32, torch.device("cpu"), False)
    layers = [m for m in model.modules() if isinstance(m, fastcnn.nn.DepthwiseConv2d)]
    assert len(layers) == depthwise and sum(m.kernel_size == (5, 5) for m in layers) == five_by_five
    logits = models.run(torch.randn(2, 3, 64, 64), name)
    assert logits.shape == (2, 1000) and 1e-3 < float(logits.std()) < 1e3


def test_run_op_races_the_backends_on_the_same_model():
    shapes = [models.Shape("mobilenet_v1", 1, 3, 64, 64), models.Shape("stn_mnist", 4, 1, 28, 28)]
    if models._has_torchvision():
        shapes[1:1] = [models.Shape(name, 1, 3, 64, 64) for name in models._TORCHVISION]
    rows = benchmarking.run_op(models, shapes=shapes, rounds=2, min_time=0.0, providers=["fastcnn[cpu]", "torch"])
    assert {(r["case"], r["layout"], r["mode"], r["provider"]) for r in rows} == {
        (s.name, layout, mode, p) for s in shapes for layout in models.LAYOUTS for mode in models.MODES
        for p in ("fastcnn[cpu]", "torch")}
    assert all(r["error"] is None for r in rows)
    # The same function of the same weights: fastcnn's layers agree with the stock ones they replace.
    # torchvision's MobileNets' channels_last input gradients differ from the NCHW reference by up
    # to 1e-2 relative under PyTorch's own layers too (rounding of another summation order, amplified by
    # the network at random weights): there fastcnn must do as well as the stock layers.
    stock = {(r["case"], r["layout"], r["mode"]): r["max_rel_error"] for r in rows if r["provider"] == "torch"}

    def allowed(r):
        if r["case"] not in models._TORCHVISION:
            return 1e-4
        return max(1e-4, 2 * stock[(r["case"], r["layout"], r["mode"])])

    assert all(r["max_rel_error"] < allowed(r) for r in rows), [
        (r["case"], r["layout"], r["mode"], r["provider"], r["max_rel_error"]) for r in rows]
    fb = [r for r in rows if r["mode"] == "forward+backward"]
    assert all(set(r["errors"]) == {"output", "grad_input"} for r in fb)


def test_model_layers_script_times_every_leaf_under_both_backends(capsys):
    """bench/model_layers.py, the per-layer view of the MobileNet case, on a small batch."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "model_layers.py")
    spec = importlib.util.spec_from_file_location("model_layers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = models._model("mobilenet_v1", torch.float32, torch.device("cpu"), False)
    layers, medians = module.layer_times(model, torch.randn(1, 3, 32, 32), ["cpu", "reference"], 2, torch.device("cpu"))
    assert len(layers) == len(medians["cpu"]) == len(medians["reference"]) == 27 * 3 + 3
    assert sum(isinstance(l, fastcnn.nn.DepthwiseConv2d) for l in layers) == 13
    assert all(t > 0 for ts in medians.values() for t in ts)
    module.main(["--batch", "1", "--layout", "nchw", "--rounds", "2"])
    printed = capsys.readouterr().out
    assert "DepthwiseConv2d" in printed and "Conv2d" in printed and "total" in printed
