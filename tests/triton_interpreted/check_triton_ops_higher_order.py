"""Gradients of gradients through the registered Triton ops (torch.ops.fastcnn._*_triton), to the
third order: the backward ops' autograd (fastcnn/ops/depthwise_conv2d.py,
fastcnn/ops/grid_sample.py) against PyTorch's F.conv2d and F.grid_sample, in fp64.

Unlike the kernel checks beside it, this one needs fastcnn installed: the registration is what it
tests. Run as a script under TRITON_INTERPRET=1 on CPU tensors (tests/test_depthwise_conv2d_triton.py
does, in a subprocess); the CUDA tests import it and call `run(device="cuda")`.
"""
import sys

import torch
import torch.nn.functional as F

import check_runner

MODES = ("bilinear", "nearest")
PADDINGS = ("zeros", "border", "reflection")


def _orders(f, tensors, count):
    """Gradients of orders 1..count of a loss whose every order depends on every tensor."""
    grads, result = f(*tensors).pow(2).sum(), ()
    for order in range(count):
        last = order + 1 == count
        step = torch.autograd.grad(grads, tensors, create_graph=not last)
        result += step
        grads = sum((g * g).sum() for g in step)
    return result


def _assert_all_close(ours, theirs, what):
    for index, (a, e) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9 * max(1.0, e.abs().max().item()),
                                   msg=lambda m: f"{what}, gradient {index}: {m}")


def check_depthwise(device):
    """Orders 1-3: the double backward is written with the two Triton ops, so it nests."""
    ops = torch.ops.fastcnn
    gen = torch.Generator().manual_seed(5)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 3, 7, 6, dtype=torch.float64, generator=gen).to(device, memory_format=layout)
        w = torch.randn(3, 1, 3, 3, dtype=torch.float64, generator=gen).to(device)
        b = torch.randn(3, dtype=torch.float64, generator=gen).to(device)
        tensors = tuple(t.requires_grad_() for t in (x, w, b))
        ours = _orders(lambda x, w, b: ops._depthwise_conv2d_triton(x, w, b, [2, 1], [1, 0, 1, 2], [1, 1]), tensors, 3)
        theirs = _orders(lambda x, w, b: F.conv2d(F.pad(x, (1, 2, 1, 0)), w, b, (2, 1), 0, 1, 3), tensors, 3)
        _assert_all_close(ours, theirs, f"depthwise {layout}")


def check_grid_sample(device):
    """Order 2 for both ops in every mode and padding; order 3 for one of them."""
    ops = torch.ops.fastcnn
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, generator=gen).to(device).requires_grad_()
    theta = (torch.eye(2, 3, dtype=torch.float64) + 0.2 * torch.randn(2, 2, 3, dtype=torch.float64, generator=gen))
    theta = theta.to(device).requires_grad_()
    grid = F.affine_grid(theta.detach(), (2, 3, 4, 7), align_corners=True).requires_grad_()
    for mode, padding in ((m, p) for m in range(2) for p in range(3)):
        names = dict(mode=MODES[mode], padding_mode=PADDINGS[padding])
        ours = _orders(lambda a, t: ops._affine_grid_sample_triton(a, t, [5, 4], mode, padding, False), (x, theta), 2)
        theirs = _orders(
            lambda a, t: F.grid_sample(a, F.affine_grid(t, (2, 3, 5, 4), align_corners=False), align_corners=False,
                                       **names), (x, theta), 2)
        _assert_all_close(ours, theirs, f"affine {names}")
        ours = _orders(lambda a, g: ops._grid_sample_triton(a, g, mode, padding, True), (x, grid), 2)
        theirs = _orders(lambda a, g: F.grid_sample(a, g, align_corners=True, **names), (x, grid), 2)
        _assert_all_close(ours, theirs, f"grid {names}")
    ours = _orders(lambda a, g: ops._grid_sample_triton(a, g, 0, 0, True), (x, grid), 3)
    theirs = _orders(lambda a, g: F.grid_sample(a, g, align_corners=True), (x, grid), 3)
    _assert_all_close(ours, theirs, "grid, orders 1-3")


def run(device="cpu", verbose=True):
    import fastcnn  # noqa: F401  (registers the ops)

    return check_runner.run_checks(
        [("depthwise_orders_1_to_3", lambda: check_depthwise(device)),
         ("grid_sample_orders_1_to_3", lambda: check_grid_sample(device))], verbose)


def main():
    missing = check_runner.interpreter_missing()
    if missing:
        return missing
    failures = run()
    check_runner.report(failures)
    print(f"{len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
