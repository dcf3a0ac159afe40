"""What a kernel switch gains, without PyTorch in the ratio: the MobileNet v1 depthwise layers
timed in one process under each value of an environment switch that the CPU kernels read on
every call (FASTCNN_DEPTHWISE_ROLLED, FASTCNN_AVX512, FASTCNN_STREAMING_STORES), in interleaved
rounds whose order alternates, medians per layer and the geometric mean over the 13 layers
(each layer counted as often as the model has it).

`fastcnn bench` ratios move with PyTorch's own time, which on a shared machine swings more than a
kernel change does; this compares fastcnn with itself on the same tensors, minutes apart at most.

    python bench/ab_depthwise_env.py --env FASTCNN_DEPTHWISE_ROLLED --values 0 1
    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736 \\
        python bench/ab_depthwise_env.py --env FASTCNN_DEPTHWISE_ROLLED --values 0 1   # reuse
"""
import argparse
import math
import os
import statistics
import time

import torch

import fastcnn
from fastcnn.bench_cases.depthwise import MOBILENET_V1


def step(x, w, stride, grad, mode):
    if mode == "forward":
        with torch.no_grad():
            fastcnn.ops.depthwise_conv2d(x, w, None, stride, 1)
        return
    x.grad = None
    w.grad = None
    fastcnn.ops.depthwise_conv2d(x, w, None, stride, 1).backward(grad)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", required=True, help="the switch, e.g. FASTCNN_DEPTHWISE_ROLLED")
    parser.add_argument("--values", nargs=2, required=True, metavar=("BASE", "NEW"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--layout", choices=["nchw", "channels_last"], default="nchw")
    parser.add_argument("--mode", choices=["forward", "forward+backward"], default="forward+backward")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    memory_format = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    base, new = args.values
    print(f"{args.env}={new} against {base}: N={args.batch} {args.layout} {args.mode}, {args.threads} threads, "
          f"{args.rounds} rounds, GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '') or '(default)'}")
    log_sum, count_sum = 0.0, 0
    previous = os.environ.get(args.env)
    try:
        for name, channels, size, stride, count in MOBILENET_V1:
            x = torch.randn(args.batch, channels, size, size).to(memory_format=memory_format).requires_grad_()
            w = torch.randn(channels, 1, 3, 3, requires_grad=True)
            with torch.no_grad():
                grad = torch.randn_like(fastcnn.ops.depthwise_conv2d(x, w, None, stride, 1))
            times = {base: [], new: []}
            for r in range(args.rounds):
                for value in (base, new) if r % 2 == 0 else (new, base):
                    os.environ[args.env] = value
                    step(x, w, stride, grad, args.mode)  # warm: caches, the output cache
                    start = time.perf_counter()
                    step(x, w, stride, grad, args.mode)
                    times[value].append(time.perf_counter() - start)
            t_base, t_new = (statistics.median(times[v]) * 1e3 for v in (base, new))
            log_sum += count * math.log(t_base / t_new)
            count_sum += count
            shape = f"{args.batch}x{channels}x{size}x{size} s{stride}"
            print(f"{name:12s} {shape:20s} {base}: {t_base:8.3f} ms  {new}: {t_new:8.3f} ms  {t_base / t_new:5.2f}x")
    finally:
        if previous is None:
            os.environ.pop(args.env, None)
        else:
            os.environ[args.env] = previous
    print(f"geometric mean over the 13 layers: {math.exp(log_sum / count_sum):.3f}x")


if __name__ == "__main__":
    main()
