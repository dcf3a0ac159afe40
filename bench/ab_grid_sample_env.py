"""What a kernel switch gains, without PyTorch in the ratio: the Spatial Transformer sampler's
benchmark shapes (fastcnn.bench_cases.grid_sample) timed in one process under each value of an
environment switch that the CPU kernels read on every call (FASTCNN_GRID_SAMPLE_PULL,
FASTCNN_GRID_SAMPLE_WINDOW_ROWS, FASTCNN_AVX512), in interleaved rounds whose order alternates:
the median per shape of t(BASE) / t(NEW), above 1 when NEW is faster.

    python bench/ab_grid_sample_env.py --env FASTCNN_GRID_SAMPLE_PULL --values 0 1
    python bench/ab_grid_sample_env.py --env FASTCNN_GRID_SAMPLE_PULL --values 0 1 --threads 1 --layout nchw

Modes: `forward` (under no_grad; not run unless asked), `backward` (the backward op alone,
grad_input and grad_theta), `grad_input` (the backward op asked for grad_input only) and
`forward+backward` (through autograd, as `fastcnn bench`).
"""
import argparse
import os
import statistics
import time

import torch

import fastcnn
from fastcnn.bench_cases import grid_sample as cases

MODES = ("forward", "backward", "grad_input", "forward+backward")


def call(mode, x, theta, size, grad):
    if mode == "forward":
        with torch.no_grad():
            fastcnn.ops.affine_grid_sample(x, theta, size)
        return
    if mode == "forward+backward":
        x.grad = None
        theta.grad = None
        fastcnn.ops.affine_grid_sample(x, theta, size).backward(grad)
        return
    mask = [True, mode == "backward"]
    torch.ops.fastcnn._affine_grid_sample_backward(grad, x.detach(), theta.detach(), 0, 0, False, mask)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", required=True, help="the switch, e.g. FASTCNN_GRID_SAMPLE_PULL")
    parser.add_argument("--values", nargs=2, required=True, metavar=("BASE", "NEW"))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES[1:]))
    parser.add_argument("--layout", choices=("nchw", "channels_last"), default="nchw")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds per measurement")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.env}: {args.values[0]} -> {args.values[1]}, {args.layout}, {torch.get_num_threads()} threads")
    for shape in cases.shapes():
        x, theta, size, *_ = cases.make_inputs(shape, torch.Generator().manual_seed(0))
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        if args.layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
            grad = grad.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        theta.requires_grad_()
        for mode in args.modes:
            def timed(value):
                os.environ[args.env] = value
                call(mode, x, theta, size, grad)
                start, calls = time.perf_counter(), 0
                while time.perf_counter() - start < args.min_time or calls < 3:
                    call(mode, x, theta, size, grad)
                    calls += 1
                return (time.perf_counter() - start) / calls

            ratios, times = [], {value: [] for value in args.values}
            for r in range(args.rounds):
                order = args.values if r % 2 == 0 else args.values[::-1]
                got = {value: timed(value) for value in order}
                for value in args.values:
                    times[value].append(got[value])
                ratios.append(got[args.values[0]] / got[args.values[1]])
            base, new = (statistics.median(times[v]) * 1e3 for v in args.values)
            print(f"{shape.name:12s} {shape.label:14s} {mode:16s} {base:8.3f} ms -> {new:8.3f} ms"
                  f"  x{statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
