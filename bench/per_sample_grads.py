"""Per-sample gradients of depthwise layers through torch.func, fastcnn's kernels against stock
PyTorch under the same transform: ``vmap(grad(loss, argnums=(weight, bias)))`` over N single
images, timed in interleaved rounds in one process, medians.

Under a torch.func transform fastcnn's depthwise_conv2d runs fastcnn/ops/_depthwise_functorch.py
(vmap folds the N problems into the channels: one kernel call); PyTorch runs its conv2d batching
rules. The two results are compared before timing.

    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736 \\
        python bench/per_sample_grads.py
"""
import argparse
import statistics
import time

import torch
from torch.func import grad, vmap

import fastcnn

# (N, C, H=W, kernel, stride): MobileNet v1's 112x112, 56x56 stride-2 and 14x14 layers, a 7x7 window
CASES = [(32, 32, 112, 3, 1), (32, 128, 56, 3, 2), (32, 512, 14, 3, 1), (8, 128, 56, 7, 1)]


def per_sample_grads(backend, x, w, b, stride):
    def loss(w, b, image):
        with fastcnn.use_backend(backend):
            return fastcnn.ops.depthwise_conv2d(image[None], w, b, stride, w.shape[-1] // 2).square().sum()

    return vmap(grad(loss, argnums=(0, 1)), in_dims=(None, None, 0))(w, b, x)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, fastcnn {fastcnn.__version__}, {args.threads} threads, fp32, {args.rounds} rounds")
    for n, c, size, k, stride in CASES:
        x, w, b = torch.randn(n, c, size, size), torch.randn(c, 1, k, k), torch.randn(c)
        ours, theirs = per_sample_grads("auto", x, w, b, stride), per_sample_grads("reference", x, w, b, stride)
        for a, e in zip(ours, theirs):
            torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-4 * e.abs().max().item())
        times = {"auto": [], "reference": []}
        for r in range(args.rounds):
            for backend in ("auto", "reference") if r % 2 else ("reference", "auto"):
                start = time.perf_counter()
                per_sample_grads(backend, x, w, b, stride)
                times[backend].append(time.perf_counter() - start)
        ours_ms, theirs_ms = (statistics.median(times[name]) * 1e3 for name in ("auto", "reference"))
        print(f"{n}x{c}x{size}x{size} {k}x{k} stride {stride}: fastcnn {ours_ms:.1f} ms, "
              f"PyTorch {theirs_ms:.1f} ms, {theirs_ms / ours_ms:.2f}x")


if __name__ == "__main__":
    main()
