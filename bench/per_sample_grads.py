"""Per-sample gradients through torch.func, fastcnn's kernels against stock PyTorch under the
same transform, timed in interleaved rounds in one process, medians: depthwise layers'
``vmap(grad(loss, argnums=(weight, bias)))`` over N single images, and the STN sampler's gradient
of each image's own theta (``vmap(grad(loss))`` over (theta_i, image_i)).

Under a torch.func transform fastcnn's ops run fastcnn/ops/_*_functorch.py (vmap folds the N
problems into the channels, or into the batch for the sampler: one kernel call); PyTorch runs
its batching rules. The two results are compared before timing.

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


# (N, C, H=W): the STN shapes of `fastcnn bench --op grid_sample`
STN_CASES = [(64, 1, 28), (32, 3, 64), (8, 3, 224)]


def per_image_theta_grads(backend, x, theta):
    def loss(theta, image):
        with fastcnn.use_backend(backend):
            out = fastcnn.ops.affine_grid_sample(image[None], theta[None], (1, *image.shape))
        return out.square().sum()

    return vmap(grad(loss))(theta, x)


def timed(function, backends, rounds):
    times = {name: [] for name in backends}
    for r in range(rounds):
        for name in backends if r % 2 else backends[::-1]:
            start = time.perf_counter()
            function(name)
            times[name].append(time.perf_counter() - start)
    return [statistics.median(times[name]) * 1e3 for name in backends]


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
        ours_ms, theirs_ms = timed(lambda name: per_sample_grads(name, x, w, b, stride), ("auto", "reference"),
                                   args.rounds)
        print(f"depthwise {n}x{c}x{size}x{size} {k}x{k} stride {stride}: fastcnn {ours_ms:.1f} ms, "
              f"PyTorch {theirs_ms:.1f} ms, {theirs_ms / ours_ms:.2f}x")
    for n, c, size in STN_CASES:
        x = torch.randn(n, c, size, size)
        theta = torch.eye(2, 3).repeat(n, 1, 1) + 0.2 * torch.randn(n, 2, 3)
        ours, theirs = per_image_theta_grads("auto", x, theta), per_image_theta_grads("reference", x, theta)
        # theta's gradient sums ~1e5 fp32 products that cancel (1e-3-1e-2 off for both at 224x224):
        # held to twice PyTorch's own error against the fp64 truth
        truth = per_image_theta_grads("reference", x.double(), theta.double())
        ours_error, theirs_error = ((t.double() - truth).abs().max().item() for t in (ours, theirs))
        assert ours_error <= 2 * theirs_error + 1e-6 * truth.abs().max().item(), (ours_error, theirs_error)
        ours_ms, theirs_ms = timed(lambda name: per_image_theta_grads(name, x, theta), ("auto", "reference"),
                                   args.rounds)
        print(f"affine_grid_sample {n}x{c}x{size}x{size}, theta per image: fastcnn {ours_ms:.2f} ms, "
              f"PyTorch {theirs_ms:.2f} ms, {theirs_ms / ours_ms:.2f}x")


if __name__ == "__main__":
    main()
