"""Where the time of one forward+backward goes, kernel by kernel: fastcnn against PyTorch.

`fastcnn bench` gives end-to-end ratios; this gives the breakdown a kernel change needs (which of
forward, grad_input, grad_weight or the reduction is slow, and what cuDNN runs instead). Each case
runs a few warm-up steps, then `--steps` forward+backward steps under torch.profiler; the table
lists, per provider, every kernel (CUDA) or op (CPU) with its calls and time per step.

    python bench/profile_kernels.py --device cuda --dtype float16 --out bench/results/cuda-h200

Cases: the MobileNet v1 depthwise layers at N=32 (NCHW and channels_last), the 7x7 layer, and the
STN shapes of fastcnn bench (default and deterministic backward). Providers: fastcnn (default
kernels), fastcnn with the opt-in kernels not yet the default (FASTCNN_CUDA_DEPTHWISE_CL=rows,
FASTCNN_CUDA_DEPTHWISE_NCHW=vec, FASTCNN_CUDA_GRID_SAMPLE_DETERMINISTIC=sort32|gather; CUDA only),
and PyTorch.
Writes profile-<dtype>.md and .json.
"""
import argparse
import contextlib
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import fastcnn
from fastcnn import benchmarking
from fastcnn.bench_cases import depthwise, grid_sample


def depthwise_cases(device, dtype, quick):
    layers = [s for s in depthwise.shapes(batches=(32,)) if s.name in ("k7",) or s.name.startswith("mbv1")]
    if quick:
        layers = layers[:2]
    for shape in layers:
        for layout in ("nchw", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            x = torch.randn(shape.n, shape.c, shape.h, shape.w, device=device, dtype=dtype).contiguous(
                memory_format=fmt).requires_grad_()
            w = torch.randn(shape.c, 1, shape.k, shape.k, device=device, dtype=dtype, requires_grad=True)
            pad = shape.padding

            def ours(x=x, w=w, s=shape.stride, p=pad):
                return fastcnn.ops.depthwise_conv2d(x, w, None, s, p)

            def torch_(x=x, w=w, s=shape.stride, p=pad, c=shape.c):
                return F.conv2d(x, w, None, s, p, 1, c)

            providers = [("fastcnn", ours, {}, False), ("torch", torch_, {}, False)]
            if device == "cuda" and layout == "channels_last":
                providers.insert(1, ("fastcnn cl-rows", ours, {"FASTCNN_CUDA_DEPTHWISE_CL": "rows"}, False))
            if device == "cuda" and layout == "nchw":
                providers.insert(1, ("fastcnn nchw-vec", ours, {"FASTCNN_CUDA_DEPTHWISE_NCHW": "vec"}, False))
            yield f"depthwise {shape.name} {shape.label} {layout}", [x, w], providers


def grid_sample_cases(device, dtype, quick):
    generator = torch.Generator().manual_seed(0)
    for shape in grid_sample.shapes(quick=True)[: 1 if quick else None]:
        x, theta, size, mode, padding_mode, align = grid_sample.make_inputs(shape, generator)
        x = x.to(device, dtype).requires_grad_()
        theta = theta.to(device, dtype).requires_grad_()

        def ours(x=x, theta=theta, size=size):
            return fastcnn.ops.affine_grid_sample(x, theta, size)

        def torch_(x=x, theta=theta, size=size):
            return F.grid_sample(x, F.affine_grid(theta, list(size), align_corners=False), align_corners=False)

        providers = [("fastcnn", ours, {}, False), ("fastcnn deterministic", ours, {}, True)]
        if device == "cuda":
            for variant in ("sort32", "gather"):
                providers.append((f"fastcnn deterministic {variant}", ours,
                                  {"FASTCNN_CUDA_GRID_SAMPLE_DETERMINISTIC": variant}, True))
        providers.append(("torch", torch_, {}, False))
        yield f"grid_sample {shape.name} {shape.label} nchw", [x, theta], providers


def profile_step(fn, leaves, steps, device, env, deterministic):
    """(rows, wall ms per step): rows = [(name, calls per step, time us per step)], slowest first."""
    grad = None

    def step():
        nonlocal grad
        y = fn()
        if grad is None:
            grad = torch.randn_like(y)
        y.backward(grad)
        for leaf in leaves:  # as an optimizer's zero_grad(set_to_none=True): no accumulation kernels
            leaf.grad = None

    context = benchmarking.deterministic_algorithms(True) if deterministic else contextlib.nullcontext()
    with benchmarking.environment_variables(env), context:
        for _ in range(3):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            if device == "cuda":
                torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3 / steps
    rows = []
    for event in prof.key_averages():
        if device == "cuda":
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            total = getattr(event, "device_time_total", None)
            if total is None:
                total = event.cuda_time_total
        else:
            # CPU: the ops that did the work (self time), not their callers or the profiler's own.
            if event.key.startswith(("ProfilerStep", "autograd::engine")):
                continue
            total = event.self_cpu_time_total
        if total > 0:
            rows.append((event.key, event.count / steps, total / steps))
    rows.sort(key=lambda r: -r[2])
    return rows, wall_ms


def short(name, width=90):
    return name if len(name) <= width else name[: width - 3] + "..."


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--ops", default="depthwise,grid_sample")
    parser.add_argument("--quick", action="store_true", help="two depthwise layers and one STN shape")
    parser.add_argument("--top", type=int, default=6, help="kernels listed per provider")
    parser.add_argument("--out", default=None, help="folder for profile-<dtype>.md/.json (default: print only)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    makers = {"depthwise": depthwise_cases, "grid_sample": grid_sample_cases}
    record = {"environment": benchmarking.environment(), "dtype": args.dtype, "steps": args.steps,
              "cases": []}
    lines = [f"# Kernel time per forward+backward step ({args.device}, {args.dtype}, {args.steps} steps)", ""]
    lines += ["| case | provider | step ms (wall) | kernel / op | calls | us per step |", "|---|---|---:|---|---:|---:|"]
    for op in args.ops.split(","):
        for case, leaves, providers in makers[op](args.device, dtype, args.quick):
            for name, fn, env, deterministic in providers:
                try:
                    rows, wall_ms = profile_step(fn, leaves, args.steps, args.device, env, deterministic)
                except Exception as exc:  # a failing provider is reported, the others still run
                    lines.append(f"| {case} | {name} | - | error: {type(exc).__name__}: {exc} | | |")
                    record["cases"].append({"case": case, "provider": name, "error": repr(exc)})
                    continue
                total_us = sum(r[2] for r in rows)
                record["cases"].append({"case": case, "provider": name, "wall_ms": wall_ms, "kernel_us": total_us,
                                        "kernels": [{"name": k, "calls": c, "us": t} for k, c, t in rows]})
                lines.append(f"| {case} | {name} | {wall_ms:.3f} | **all ({len(rows)})** | | {total_us:.1f} |")
                for kernel, calls, us in rows[: args.top]:
                    lines.append(f"| | | | `{short(kernel)}` | {calls:g} | {us:.1f} |")
            print(f"done: {case}", file=sys.stderr, flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"profile-{args.dtype}.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(args.out, f"profile-{args.dtype}.json"), "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
