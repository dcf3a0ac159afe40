"""Checks of the depthwise conv2d Triton kernels (kernels/depthwise_conv2d.py) against
F.conv2d(groups=C), forward and all three gradients.

Run as a script under TRITON_INTERPRET=1 (tests/test_depthwise_conv2d_triton.py does, in a
subprocess, because the variable must be set before triton is imported) on CPU tensors; the same
module is imported by the CUDA tests, which call `run_cases` with device="cuda".

Every output the launchers allocate is NaN-filled first (through the kernels module's `_empty`
seam), so an element a kernel fails to write shows up as a mismatch.
"""
import contextlib
import math
import sys

import torch
import torch.nn.functional as F

import check_runner
import working_tree_kernels

REPO = working_tree_kernels.REPO


def load_kernels():
    """The working tree's kernels/depthwise_conv2d.py (see working_tree_kernels)."""
    return working_tree_kernels.load("depthwise_conv2d")


def _nan_empty(*args, **kwargs):
    t = torch.empty(*args, **kwargs)
    if t.is_floating_point():
        t.fill_(math.nan)
    return t


@contextlib.contextmanager
def poisoned(kernels, **overrides):
    """NaN-filled allocations, plus temporary overrides of the module's block-size constants."""
    saved = {name: getattr(kernels, name) for name in ["_empty", *overrides]}
    kernels._empty = _nan_empty
    for name, value in overrides.items():
        setattr(kernels, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(kernels, name, value)


def case(name, n=2, c=5, h=9, w=7, k=(3, 3), stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1),
         bias=True, layout="nchw", grad="random", dtype=torch.float32, mask=(True, True, True), **overrides):
    return dict(name=name, n=n, c=c, h=h, w=w, k=k, stride=stride, padding=padding, dilation=dilation,
                bias=bias, layout=layout, grad=grad, dtype=dtype, mask=mask, overrides=overrides)


# Small shapes: the interpreter runs each program in numpy, about 10 ms to 1 s a launch here.
INTERPRETED_CASES = [
    case("basic_nchw_odd"),
    case("channels_last_odd", layout="channels_last"),
    case("stride2_odd_input", n=1, c=17, h=11, w=9, stride=(2, 2), layout="channels_last"),
    case("pad_gt_half_asymmetric", padding=(3, 0, 2, 4)),
    case("dilation2_rect3x5_mixed_stride", c=6, h=10, w=11, k=(3, 5), stride=(2, 1),
         padding=(2, 1, 3, 2), dilation=(2, 2), layout="channels_last"),
    case("rect5x2_stride_1x3", c=3, h=8, w=13, k=(5, 2), stride=(1, 3), padding=(0, 2, 1, 0),
         dilation=(1, 3), bias=False),
    case("permuted_view_input", layout="permuted", grad="channels_last"),
    case("sliced_input", c=4, layout="sliced", stride=(2, 1)),
    case("sliced_channels_last", c=17, layout="sliced_channels_last", grad="permuted"),
    case("grad_expanded_per_channel", grad="expand_channel"),
    case("grad_of_sum_scalar_expanded", layout="channels_last", grad="expand_scalar"),
    case("batch0", n=0),
    case("batch0_channels_last", n=0, layout="channels_last"),
    case("zero_channels", c=0),
    case("batch1_7x7_stride2", n=1, c=3, h=13, w=12, k=(7, 7), stride=(2, 2), padding=(3, 3, 3, 3)),
    case("channel_blocks_64_plus_6", n=1, c=70, h=6, w=5, layout="channels_last"),
    case("pixel_tiles_nchw", n=2, c=2, h=17, w=19, stride=(1, 1)),
    # 2 channel blocks x 9 taps and a target of 20 programs: 2 splits of 2 units over 3 units,
    # so the last split is ragged.
    case("grad_weight_ragged_splits", n=3, c=70, h=5, w=3, layout="channels_last", _GRAD_WEIGHT_PROGRAMS=20),
    case("kernel1x1_spatial1x1", n=2, c=5, h=1, w=1, k=(1, 1), padding=(0, 0, 0, 0)),
    case("empty_input_rows_all_padding", n=1, c=3, h=0, w=4, padding=(2, 2, 1, 1)),
    # 961 taps cost the interpreter about 3 s a launch, 7 s for grad_input and 20 s for the 961
    # grad_weight programs: the full 31x31 backward runs in the CUDA tests; here the forward, and
    # the backward with 31-tap rows and columns.
    case("kernel31x31_same", n=1, c=3, h=9, w=8, k=(31, 31), padding=(15, 15, 15, 15), mask=(False, False, True)),
    case("kernel31x2", n=2, c=3, h=7, w=6, k=(31, 2), padding=(15, 16, 0, 1), stride=(2, 1)),
    case("kernel2x31", n=1, c=9, h=5, w=7, k=(2, 31), padding=(1, 0, 12, 14), layout="channels_last"),
    case("mask_input_only", mask=(True, False, False)),
    case("mask_weight_only", layout="channels_last", mask=(False, True, False)),
    case("mask_bias_only", mask=(False, False, True)),
    case("mask_weight_bias_no_input", bias=False, mask=(False, True, False)),
    case("fp16", dtype=torch.float16, layout="channels_last", stride=(2, 2)),
    case("bf16", dtype=torch.bfloat16, padding=(2, 0, 0, 2)),
    case("fp64", dtype=torch.float64, c=4, dilation=(2, 1), padding=(2, 2, 1, 1)),
]


def _make_input(spec, gen, device):
    n, c, h, w, dtype = spec["n"], spec["c"], spec["h"], spec["w"], spec["dtype"]
    layout = spec["layout"]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    if layout == "nchw":
        return randn(n, c, h, w)
    if layout == "channels_last":
        return randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    if layout == "permuted":  # strides (H*C*W, W, C*W, 1): neither NCHW nor NHWC
        return randn(n, h, c, w).permute(0, 2, 1, 3)
    if layout == "sliced":  # every stride > the dense one, W stride 2
        return randn(n, 2 * c + 1, h + 3, 2 * w)[:, 1::2, 2:h + 2, ::2]
    if layout == "sliced_channels_last":  # NHWC-like strides, not dense
        return randn(n, c + 2, h, w + 3).contiguous(memory_format=torch.channels_last)[:, 1:c + 1, :, 2:w + 2]
    raise ValueError(layout)


def _make_grad(spec, shape, gen, device):
    n, c, ho, wo = shape

    def randn(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64).to(device=device, dtype=spec["dtype"])

    kind = spec["grad"]
    if kind == "random":
        return randn(n, c, ho, wo)
    if kind == "channels_last":
        return randn(n, c, ho, wo).contiguous(memory_format=torch.channels_last)
    if kind == "permuted":
        return randn(c, wo, n, ho).permute(2, 0, 3, 1)
    if kind == "expand_channel":
        return randn(1, c, 1, 1).expand(n, c, ho, wo)
    if kind == "expand_scalar":  # what y.sum().backward() hands over, scaled
        return randn(()).expand(n, c, ho, wo)
    raise ValueError(kind)


def _reference(x, w, b, stride, padding, dilation):
    top, bottom, left, right = padding
    if x.shape[1] == 0:  # F.conv2d refuses groups=0; the answer is empty
        ho, wo = ((size + pads - d * (k - 1) - 1) // s + 1 for size, pads, d, k, s in zip(
            x.shape[2:], (top + bottom, left + right), dilation, w.shape[2:], stride))
        return x.new_empty((x.shape[0], 0, ho, wo))
    return F.conv2d(F.pad(x, (left, right, top, bottom)), w, b, stride, 0, dilation, groups=x.shape[1])


def _compare(what, ours, truth, torch_lowp, dtype):
    """fp32/fp64: tight tolerance against the fp64 truth. fp16/bf16: our error against the fp64
    truth at most 2x PyTorch's own error in that dtype (plus one rounding of the largest value)."""
    ours64 = ours.double()
    if not torch.isfinite(ours64).all():
        raise AssertionError(f"{what}: {(~torch.isfinite(ours64)).sum().item()} non-finite elements "
                             f"(unwritten output?) of {ours64.numel()}")
    if ours.numel() == 0:
        return
    err = (ours64 - truth).abs().max().item()
    scale = truth.abs().max().item() + 1.0
    if dtype == torch.float64:
        tol = 1e-12 * scale
    elif dtype == torch.float32:
        tol = 2e-6 * scale
    else:
        torch_err = (torch_lowp.double() - truth).abs().max().item()
        tol = 2 * torch_err + torch.finfo(dtype).eps * scale
    if not err <= tol:
        raise AssertionError(f"{what}: max abs error {err:.3g} > tolerance {tol:.3g}")


def run_case(kernels, spec, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    dtype = spec["dtype"]
    kh, kw = spec["k"]
    stride, padding, dilation = spec["stride"], spec["padding"], spec["dilation"]
    x = _make_input(spec, gen, device)
    c = x.shape[1]
    weight = torch.randn(c, 1, kh, kw, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    bias = torch.randn(c, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) if spec["bias"] else None

    # Truth in fp64 from the very values the kernel sees; PyTorch's own low-precision result
    # calibrates the fp16/bf16 tolerance.
    leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    y64 = _reference(*leaves64, stride, padding, dilation)
    lowp = dtype in (torch.float16, torch.bfloat16)
    if lowp:
        leaves_lp = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
        y_lp = _reference(*leaves_lp, stride, padding, dilation)

    with poisoned(kernels, **spec["overrides"]):
        y = kernels.forward(x, weight, bias, stride, padding, dilation)
    assert y.shape == y64.shape, f"output shape {tuple(y.shape)}, expected {tuple(y64.shape)}"
    assert y.dtype == dtype and y.device == x.device
    expected_format = torch._prims_common.suggest_memory_format(x)
    assert y.is_contiguous(memory_format=expected_format), f"output strides {y.stride()} not {expected_format}"
    _compare("forward", y, y64.detach(), y_lp.detach() if lowp else None, dtype)

    go = _make_grad(spec, tuple(y.shape), gen, device)
    mask = [m and leaf is not None for m, leaf in zip(spec["mask"], (x, weight, bias))]
    with poisoned(kernels, **spec["overrides"]):
        grads = kernels.backward(go, x, weight, stride, padding, dilation, mask)
    if y.numel() > 0:
        wanted = [t for t, m in zip(leaves64, mask) if m and t is not None]
        truths = iter(torch.autograd.grad(y64, wanted, go.double()))
        if lowp:
            wanted_lp = [t for t, m in zip(leaves_lp, mask) if m and t is not None]
            lowps = iter(torch.autograd.grad(y_lp, wanted_lp, go))
    else:  # no output: every gradient is zero
        zeros = [torch.zeros_like(t) for t, m in zip(leaves64, mask) if m and t is not None]
        truths, lowps = iter(zeros), iter(zeros)
    for name, ours, m, leaf in zip(("grad_input", "grad_weight", "grad_bias"), grads, mask, (x, weight, bias)):
        if not m or leaf is None:
            assert ours.numel() == 0, f"{name} not requested but has shape {tuple(ours.shape)}"
            continue
        assert ours.shape == leaf.shape and ours.dtype == leaf.dtype, (
            f"{name}: {tuple(ours.shape)} {ours.dtype}, expected {tuple(leaf.shape)} {leaf.dtype}")
        if name == "grad_input":
            assert ours.is_contiguous(memory_format=expected_format), f"grad_input strides {ours.stride()}"
        else:
            assert ours.is_contiguous(), f"{name} strides {ours.stride()}"
        _compare(name, ours, next(truths), next(lowps) if lowp else None, dtype)
    return grads


def check_deterministic(kernels, device="cpu"):
    """Two backward passes give bitwise equal gradients (no atomics anywhere)."""
    spec = case("deterministic", n=3, c=6, h=10, w=9, stride=(2, 2), layout="channels_last")
    first = run_case(kernels, spec, device, seed=1)
    second = run_case(kernels, spec, device, seed=1)
    for a, b in zip(first, second):
        assert torch.equal(a, b), "backward is not bitwise reproducible"


def run_cases(cases, device="cpu", verbose=True):
    """Runs every case; returns the list of (name, error text) failures."""
    kernels = load_kernels()
    checks = [(spec["name"], lambda spec=spec: run_case(kernels, spec, device)) for spec in cases]
    checks.append(("deterministic", lambda: check_deterministic(kernels, device)))
    return check_runner.run_checks(checks, verbose)


def main():
    missing = check_runner.interpreter_missing()
    if missing:
        return missing
    torch.manual_seed(0)
    failures = run_cases(INTERPRETED_CASES)
    check_runner.report(failures)
    print(f"{len(INTERPRETED_CASES) + 1 - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
