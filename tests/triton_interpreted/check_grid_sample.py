"""Checks of the Spatial Transformer Triton kernels (kernels/grid_sample.py) against
F.grid_sample and F.affine_grid + F.grid_sample: forward, grad_input and grad_grid / grad_theta,
with the atomic and the deterministic backward.

Run as a script under TRITON_INTERPRET=1 (tests/test_grid_sample_triton.py does, in a subprocess,
because the variable must be set before triton is imported) on CPU tensors; the same module is
imported by the CUDA tests, which call `run_cases` with device="cuda".

Besides the comparisons, `check_gradcheck` runs an fp64 torch.autograd.gradcheck of the launchers
(our backward against finite differences of our forward), and cases flagged `repeat` run the
deterministic backward twice and require bitwise equal results.

Every output the launchers allocate is NaN-filled first (through the kernels module's `_empty`
seam), so an element a kernel fails to write shows up as a mismatch.

Non-finite coordinates follow fastcnn's documented rule (PyTorch's CUDA one): a NaN coordinate,
or an infinite one under zeros/reflection padding, samples as padding: output 0 and no gradient
flows through that pixel. An infinite coordinate under border padding clamps to the border, like
any huge value. The reference therefore sees those pixels with a finite stand-in coordinate
(±1e30 under border, 0 otherwise) and a zeroed grad_output, and their expected output is 0;
PyTorch's CPU kernel itself would return NaN there.
"""
import contextlib
import math
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import check_runner
import working_tree_kernels

REPO = working_tree_kernels.REPO
MODES = ("bilinear", "nearest")
PADDINGS = ("zeros", "border", "reflection")


def load_kernels():
    """The working tree's kernels/grid_sample.py (see working_tree_kernels)."""
    return working_tree_kernels.load("grid_sample")


def _poison_empty(*args, **kwargs):
    t = torch.empty(*args, **kwargs)
    if t.is_floating_point():
        t.fill_(math.nan)
    elif t.numel() > 0:
        t.fill_(-12345)  # an unwritten key or index points nowhere sensible
    return t


@contextlib.contextmanager
def poisoned(kernels, **overrides):
    """Poisoned allocations, plus temporary overrides of the module's block-size constants."""
    saved = {name: getattr(kernels, name) for name in ["_empty", *overrides]}
    kernels._empty = _poison_empty
    for name, value in overrides.items():
        setattr(kernels, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(kernels, name, value)


def case(name, n=2, c=3, h=5, w=6, ho=4, wo=7, affine=False, mode="bilinear", padding="zeros", align=False,
         layout="nchw", grad="random", coords="random", dtype=torch.float32, mask=(True, True),
         backwards=(False, True), repeat=False, **overrides):
    """backwards: the `deterministic` flags to run the backward with; repeat: run the
    deterministic backward twice and require bitwise equal results."""
    return dict(name=name, n=n, c=c, h=h, w=w, ho=ho, wo=wo, affine=affine, mode=mode, padding=padding,
                align=align, layout=layout, grad=grad, coords=coords, dtype=dtype, mask=mask,
                backwards=backwards, repeat=repeat, overrides=overrides)


def _product_cases(dtype, tag):
    """Every mode x padding x align_corners x (grid, theta), rotating layouts and gradient kinds
    so that each combination meets several of them."""
    layouts = ("nchw", "channels_last", "permuted", "sliced_channels_last")
    grads = ("random", "expand_scalar", "permuted", "channels_last", "expand_channel")
    cases, i = [], 0
    for mode in MODES:
        for padding in PADDINGS:
            for align in (False, True):
                for affine in (False, True):
                    coords = ("random", "zoom_out", "transposed")[i % 3] if affine else ("random", "permuted")[i % 2]
                    name = f"{tag}_{'theta' if affine else 'grid'}_{mode}_{padding}_{'ac' if align else 'noac'}"
                    cases.append(case(name, affine=affine, mode=mode, padding=padding, align=align,
                                      layout=layouts[i % len(layouts)], grad=grads[i % len(grads)],
                                      coords=coords, dtype=dtype, c=3 + i % 3))
                    i += 1
    return cases


# Small shapes: the interpreter runs each program in numpy.
INTERPRETED_CASES = (
    _product_cases(torch.float32, "fp32")
    + [spec for spec in _product_cases(torch.float64, "fp64") if spec["affine"] == (spec["padding"] != "border")]
    + [
        case("theta_entirely_outside_zeros", affine=True, coords="outside", padding="zeros"),
        case("theta_entirely_outside_border", affine=True, coords="outside", padding="border", layout="channels_last"),
        case("theta_entirely_outside_reflection", affine=True, coords="outside", padding="reflection", align=True),
        case("grid_entirely_outside_reflection_nearest", coords="outside", padding="reflection", mode="nearest"),
        case("grid_many_folds_reflection", coords="many_folds", padding="reflection", dtype=torch.float64),
        case("grid_many_folds_reflection_ac", coords="many_folds", padding="reflection", align=True,
             layout="channels_last"),
        case("nearest_ties_to_even", coords="half_pixel", mode="nearest", h=4, w=8, dtype=torch.float64),
        case("nearest_ties_to_even_ac", coords="half_pixel", mode="nearest", h=3, w=5, align=True,
             layout="channels_last"),
        case("nearest_ties_to_even_border", coords="half_pixel", mode="nearest", padding="border", h=4, w=8),
        case("nonfinite_grid_zeros", coords="nonfinite", padding="zeros"),
        case("nonfinite_grid_border", coords="nonfinite", padding="border", layout="channels_last"),
        case("nonfinite_grid_reflection", coords="nonfinite", padding="reflection", align=True, dtype=torch.float64),
        case("nonfinite_grid_nearest", coords="nonfinite", padding="zeros", mode="nearest"),
        case("nonfinite_theta_zeros", n=3, affine=True, coords="nonfinite", padding="zeros"),
        case("nonfinite_theta_border", n=3, affine=True, coords="nonfinite", padding="border",
             layout="channels_last", dtype=torch.float64),
        case("nonfinite_theta_reflection", n=3, affine=True, coords="nonfinite", padding="reflection"),
        # Channels past one block: a channel loop of 64 + 6 (channels_last) and 3 x 32 (NCHW).
        case("channels_70_channels_last", n=1, c=70, h=4, w=5, ho=3, wo=6, affine=True, layout="channels_last",
             repeat=True),
        case("channels_70_nchw", n=1, c=70, h=4, w=5, ho=5, wo=6, padding="border"),
        # grad_input alone: the atomic backward also splits the channels over programs (3 x 32,
        # and 64 + 6 for channels_last).
        case("channel_splits_input_only", n=1, c=70, h=4, w=5, ho=5, wo=6, affine=True, mask=(True, False)),
        case("channel_splits_input_only_nearest_cl", n=2, c=70, h=3, w=5, ho=4, wo=3, mode="nearest",
             layout="channels_last", mask=(True, False)),
        # Several pixel tiles per image (theta partial sums over tiles; gather blocks).
        case("pixel_tiles_nchw", n=2, c=2, h=17, w=19, ho=17, wo=18, affine=True, padding="reflection",
             repeat=True),
        case("small_tiles_channels_last", n=2, c=5, h=7, w=6, ho=7, wo=5, affine=True, layout="channels_last",
             grad="expand_scalar", repeat=True, _TILE=64),
        case("small_tiles_grid_nearest", n=2, c=5, h=4, w=7, ho=6, wo=5, mode="nearest", layout="channels_last",
             repeat=True, _TILE=32),
        # The deterministic backward's sort in runs of whole images (torch.sort's limit, made small:
        # 80 entries an image, runs of two images and one).
        case("sort_in_image_runs", n=3, c=2, h=5, w=6, ho=4, wo=5, affine=True, repeat=True, _MAX_SORT_ENTRIES=170),
        case("sort_in_image_runs_grid_cl", n=3, c=3, h=5, w=6, ho=4, wo=5, layout="channels_last", repeat=True,
             _MAX_SORT_ENTRIES=80),
        # Degenerate sizes: 1x1 input (reflection's twice_low == twice_high with align_corners),
        # one-pixel output rows/columns (affine base coordinate 0), upsampling, a single channel.
        case("input_1x1_reflection_ac", h=1, w=1, affine=True, padding="reflection", align=True),
        case("input_1x1_bilinear", h=1, w=1, padding="border"),
        case("input_1xW_reflection", h=1, w=6, padding="reflection", coords="many_folds"),
        case("output_1x1", ho=1, wo=1, affine=True, padding="border"),
        case("output_1xW_ac", ho=1, wo=9, affine=True, align=True, layout="channels_last"),
        case("upsample_3x_single_channel", n=1, c=1, h=4, w=3, ho=12, wo=9, affine=True, repeat=True),
        case("mask_input_only", affine=True, mask=(True, False)),
        case("mask_theta_only", affine=True, mask=(False, True), layout="channels_last"),
        case("mask_grid_only_nearest", mode="nearest", mask=(False, True)),
        case("batch0_grid", n=0),
        case("empty_output_grid", ho=0, wo=5),
        case("zero_channels_theta", c=0, affine=True),
        case("fp16_theta_channels_last", affine=True, layout="channels_last", dtype=torch.float16),
        case("bf16_grid_reflection", padding="reflection", dtype=torch.bfloat16),
    ]
)


# ----------------------------------------------------------------------------------------------
# Inputs


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _rand(gen, *shape):
    return torch.rand(*shape, generator=gen, dtype=torch.float64)


def _make_input(spec, gen, device):
    n, c, h, w, dtype = spec["n"], spec["c"], spec["h"], spec["w"], spec["dtype"]

    def randn(*shape):
        return _randn(gen, *shape).to(device=device, dtype=dtype)

    layout = spec["layout"]
    if layout == "nchw":
        return randn(n, c, h, w)
    if layout == "channels_last":
        return randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    if layout == "permuted":  # strides (H*C*W, W, C*W, 1): neither NCHW nor NHWC
        return randn(n, h, c, w).permute(0, 2, 1, 3)
    if layout == "sliced_channels_last":  # NHWC-like strides, not dense
        return randn(n, c + 2, h, w + 3).contiguous(memory_format=torch.channels_last)[:, 1:c + 1, :, 2:w + 2]
    raise ValueError(layout)


def _make_grad(spec, shape, gen, device):
    n, c, ho, wo = shape

    def randn(*s):
        return _randn(gen, *s).to(device=device, dtype=spec["dtype"])

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


def _half_pixel_grid(spec, gen):
    """Normalised coordinates whose pixel coordinates are exactly m + 0.5 (ties for nearest),
    some outside the input. Exact when the unnormalize divisor is a power of two."""
    n, ho, wo, h, w, align = spec["n"], spec["ho"], spec["wo"], spec["h"], spec["w"], spec["align"]
    grid = torch.empty(n, ho, wo, 2, dtype=torch.float64)
    for axis, size in ((0, w), (1, h)):
        m = torch.randint(-2, size + 1, (n, ho, wo), generator=gen).double()
        pixel = m + 0.5
        if align:
            grid[..., axis] = pixel * 2 / (size - 1) - 1
        else:
            grid[..., axis] = (pixel * 2 + 1) / size - 1
    return grid


def _make_coords(spec, gen):
    """(coords, coords_for_reference, bad) in fp64 on the CPU. bad [N, Ho, Wo] marks the pixels
    that sample as padding because of a non-finite coordinate (see the module docstring)."""
    n, ho, wo = spec["n"], spec["ho"], spec["wo"]
    kind = spec["coords"]
    if spec["affine"]:
        scale = 0.7 + 0.6 * _rand(gen, n, 1, 1)
        theta = torch.eye(2, 3, dtype=torch.float64) * scale + 0.25 * _randn(gen, n, 2, 3)
        if kind == "zoom_out":  # samples partly outside
            theta[:, :, :2] *= 1.8
        elif kind == "outside":  # every sample outside: translated by 2.5..3.5
            theta[:, :, 2] = (2.5 + _rand(gen, n, 2)) * torch.where(_rand(gen, n, 2) < 0.5, -1.0, 1.0)
        elif kind == "nonfinite":
            theta[0, 0, 1] = math.nan  # every x of image 0 is NaN
            if n > 1:
                theta[1, 1, 2] = math.inf  # every y of image 1 is +inf
        elif kind not in ("random", "transposed"):
            raise ValueError(kind)
        coords = theta
    else:
        if kind in ("random", "permuted", "nonfinite"):
            coords = 2.5 * _rand(gen, n, ho, wo, 2) - 1.25
        elif kind == "outside":
            coords = (1.2 + 2 * _rand(gen, n, ho, wo, 2)) * torch.where(_rand(gen, n, ho, wo, 2) < 0.5, -1.0, 1.0)
        elif kind == "many_folds":
            coords = 80 * _rand(gen, n, ho, wo, 2) - 40
        elif kind == "half_pixel":
            coords = _half_pixel_grid(spec, gen)
        else:
            raise ValueError(kind)
        if kind == "nonfinite":
            flat = coords.view(-1)
            picks = torch.randperm(flat.numel(), generator=gen)[: max(3, flat.numel() // 6)]
            for i, where in enumerate(picks.tolist()):
                flat[where] = (math.nan, math.inf, -math.inf)[i % 3]

    # Stand-ins for the reference, and the pixels that sample as padding.
    border = spec["padding"] == "border"
    ref = coords.clone()
    ref[torch.isnan(ref)] = 0.0
    ref[torch.isinf(ref)] = torch.sign(ref[torch.isinf(ref)]) * 1e30 if border else 0.0
    if spec["affine"]:
        base = _affine_grid(coords, ho, wo, spec["align"]) if n * ho * wo > 0 else torch.zeros(n, ho, wo, 2)
    else:
        base = coords
    bad_coord = torch.isnan(base) | (torch.isinf(base) & (not border))
    return coords, ref, bad_coord.any(dim=-1)


def _layout_coords(spec, coords, dtype, device):
    """The coordinates in the case's dtype, device and layout (views for 'permuted' grids and
    'transposed' thetas)."""
    t = coords.to(device=device, dtype=dtype)
    if spec["coords"] == "permuted":
        return t.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    if spec["coords"] == "transposed":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    return t


def _affine_grid(theta, ho, wo, align):
    with warnings.catch_warnings():  # PyTorch warns about 1-pixel outputs with align_corners
        warnings.simplefilter("ignore", UserWarning)
        return F.affine_grid(theta, [theta.shape[0], 1, ho, wo], align_corners=align)


def _reference(spec, x, coords):
    size = [x.shape[0], x.shape[1], spec["ho"], spec["wo"]]
    grid = _affine_grid(coords, spec["ho"], spec["wo"], spec["align"]) if spec["affine"] else coords
    if x.shape[1] == 0 or x.shape[0] == 0:  # keep the graph connected for autograd.grad
        return x.new_zeros(size) + 0 * grid.sum() + 0 * x.sum()
    return F.grid_sample(x, grid, mode=spec["mode"], padding_mode=spec["padding"], align_corners=spec["align"])


# ----------------------------------------------------------------------------------------------
# Comparison


def _tolerance(truth, torch_lowp, dtype):
    scale = truth.abs().max().item() + 1.0 if truth.numel() else 1.0
    if dtype == torch.float64:
        return 1e-11 * scale
    torch_err = (torch_lowp.double() - truth).abs().max().item() if truth.numel() else 0.0
    return 2 * torch_err + 4 * torch.finfo(dtype).eps * scale


def _compare(what, ours, truth, torch_lowp, dtype):
    """fp64: tight tolerance against the fp64 truth. Lower precisions: our error against the
    fp64 truth at most 2x PyTorch's own error in that dtype, plus a few roundings."""
    ours64 = ours.double().cpu()
    if not torch.isfinite(ours64).all():
        raise AssertionError(f"{what}: {(~torch.isfinite(ours64)).sum().item()} non-finite elements "
                             f"(unwritten output?) of {ours64.numel()}")
    if ours.numel() == 0:
        return
    err = (ours64 - truth).abs().max().item()
    tol = _tolerance(truth, torch_lowp, dtype)
    if not err <= tol:
        worst = (ours64 - truth).abs().flatten().argmax().item()
        raise AssertionError(f"{what}: max abs error {err:.3g} > tolerance {tol:.3g} (at flat index {worst}: "
                             f"ours {ours64.flatten()[worst].item():.6g}, truth {truth.flatten()[worst].item():.6g})")


def run_case(kernels, spec, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    dtype = spec["dtype"]
    mode, padding, align = spec["mode"], spec["padding"], spec["align"]
    interpolation = MODES.index(mode)
    padding_code = PADDINGS.index(padding)
    x = _make_input(spec, gen, device)
    coords64, coords_ref64, bad = _make_coords(spec, gen)
    coords = _layout_coords(spec, coords64, dtype, device)
    grid, theta = (None, coords) if spec["affine"] else (coords, None)
    bad_px = bad[:, None].to(device)  # [N, 1, Ho, Wo]

    # Truth in fp64 from the very values the kernel sees (with the stand-in coordinates);
    # PyTorch's own result in the case's dtype calibrates the tolerance.
    x64 = x.detach().double().requires_grad_()
    c64 = coords_ref64.to(device).requires_grad_()
    y64 = _reference(spec, x64, c64)
    lowp = dtype != torch.float64
    if lowp:
        x_lp = x.detach().clone().requires_grad_()
        c_lp = coords_ref64.to(device=device, dtype=dtype).requires_grad_()
        y_lp = _reference(spec, x_lp, c_lp)

    with poisoned(kernels, **spec["overrides"]):
        y = kernels.forward(x, grid, theta, (spec["ho"], spec["wo"]), interpolation, padding_code, align)
    expected_shape = (x.shape[0], x.shape[1], spec["ho"], spec["wo"])
    assert tuple(y.shape) == expected_shape, f"output shape {tuple(y.shape)}, expected {expected_shape}"
    assert y.dtype == dtype and y.device == x.device
    expected_format = torch._prims_common.suggest_memory_format(x)
    assert y.is_contiguous(memory_format=expected_format), f"output strides {y.stride()} not {expected_format}"
    truth_y = torch.where(bad_px, 0.0, y64.detach()).cpu()
    _compare("forward", y, truth_y, torch.where(bad_px, 0.0, y_lp.detach()).cpu() if lowp else None, dtype)
    if bad.any():
        assert (y.double() * bad_px == 0).all(), "non-finite coordinates must sample as zero padding"

    go = _make_grad(spec, tuple(y.shape), gen, device)
    go_ref = go * ~bad_px  # no gradient flows through a pixel that samples as padding
    mask = list(spec["mask"])
    leaves64 = [t for t, m in zip((x64, c64), mask) if m]
    truths = torch.autograd.grad(y64, leaves64, go_ref.double(), allow_unused=True) if leaves64 else ()
    truths = [torch.zeros_like(leaf) if t is None else t for t, leaf in zip(truths, leaves64)]
    if lowp:
        leaves_lp = [t for t, m in zip((x_lp, c_lp), mask) if m]
        lowps = torch.autograd.grad(y_lp, leaves_lp, go_ref, allow_unused=True) if leaves_lp else ()
        lowps = [torch.zeros_like(leaf) if t is None else t for t, leaf in zip(lowps, leaves_lp)]

    results = {}
    for deterministic in spec["backwards"]:
        runs = 2 if (deterministic and spec["repeat"]) else 1
        for run in range(runs):
            with poisoned(kernels, **spec["overrides"]):
                grads = kernels.backward(go, x, grid, theta, interpolation, padding_code, align, mask, deterministic)
            if run == 1:
                for a, b in zip(grads, results[deterministic]):
                    assert torch.equal(a, b), "deterministic backward is not bitwise reproducible"
            results[deterministic] = grads
        tag = "deterministic" if deterministic else "atomic"
        it_truth, it_lowp = iter(truths), iter(lowps if lowp else truths)
        names = ("grad_input", "grad_theta" if spec["affine"] else "grad_grid")
        for name, ours, m, leaf in zip(names, grads, mask, (x, coords)):
            if not m:
                assert ours.numel() == 0, f"{name} not requested but has shape {tuple(ours.shape)}"
                continue
            assert ours.shape == leaf.shape and ours.dtype == leaf.dtype, (
                f"{tag} {name}: {tuple(ours.shape)} {ours.dtype}, expected {tuple(leaf.shape)} {leaf.dtype}")
            if name == "grad_input":
                assert ours.is_contiguous(memory_format=expected_format), f"{tag} grad_input strides {ours.stride()}"
            else:
                assert ours.is_contiguous(), f"{tag} {name} strides {ours.stride()}"
            truth = next(it_truth).detach().cpu()
            _compare(f"{tag} {name}", ours, truth, next(it_lowp).detach().cpu() if lowp else None, dtype)
    if len(results) == 2:  # atomic and deterministic agree within the tolerance
        for ours_a, ours_d, truth, lp in zip(results[False], results[True], truths, lowps if lowp else truths):
            if ours_a.numel():
                tol = _tolerance(truth.detach().cpu(), lp.detach().cpu() if lowp else None, dtype)
                err = (ours_a.double() - ours_d.double()).abs().max().item()
                assert err <= tol, f"atomic and deterministic backwards differ by {err:.3g} > {tol:.3g}"
    return results


def check_gradcheck(kernels, device="cpu"):
    """fp64 torch.autograd.gradcheck of the launchers on tiny shapes: the backward is the
    derivative of our own forward (independently of PyTorch's kernels), in both backward modes."""
    gen = torch.Generator().manual_seed(3)

    class Sample(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, coords, affine, out_hw, padding, align, deterministic):
            grid, theta = (None, coords) if affine else (coords, None)
            ctx.save_for_backward(x, coords)
            ctx.config = (affine, padding, align, deterministic)
            return kernels.forward(x, grid, theta, out_hw, 0, padding, align)

        @staticmethod
        def backward(ctx, grad_output):
            x, coords = ctx.saved_tensors
            affine, padding, align, deterministic = ctx.config
            grid, theta = (None, coords) if affine else (coords, None)
            gx, gc = kernels.backward(grad_output, x, grid, theta, 0, padding, align, [True, True], deterministic)
            return gx, gc, None, None, None, None, None

    for affine, padding, align in ((True, 2, False), (False, 1, True), (True, 0, True)):
        for deterministic in (False, True):
            x = _randn(gen, 1, 2, 3, 4).to(device).requires_grad_()
            if affine:
                coords = torch.eye(2, 3, dtype=torch.float64) * 1.2 + 0.3 * _randn(gen, 1, 2, 3)
            else:
                coords = 2.6 * _rand(gen, 1, 2, 3, 2) - 1.3
            coords = coords.to(device).requires_grad_()
            torch.autograd.gradcheck(
                lambda x, c: Sample.apply(x, c, affine, (2, 3), padding, align, deterministic), (x, coords),
                fast_mode=True)  # random projections: a few kernel calls instead of one per element


def run_cases(cases, device="cpu", verbose=True, gradcheck=True):
    """Runs every case (and the gradcheck); returns the list of (name, error text) failures."""
    kernels = load_kernels()
    checks = [(spec["name"], lambda spec=spec: run_case(kernels, spec, device)) for spec in cases]
    if gradcheck:
        checks.append(("gradcheck_fp64", lambda: check_gradcheck(kernels, device)))
    return check_runner.run_checks(checks, verbose, name_width=48)


def main():
    missing = check_runner.interpreter_missing()
    if missing:
        return missing
    torch.manual_seed(0)
    only = sys.argv[1:]  # optional case-name substrings
    cases = [spec for spec in INTERPRETED_CASES if not only or any(s in spec["name"] for s in only)]
    start = time.perf_counter()
    failures = run_cases(cases, gradcheck=not only or any(s in "gradcheck_fp64" for s in only))
    check_runner.report(failures)
    print(f"{len(failures)} failed in {time.perf_counter() - start:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
