"""CPU outputs of 2 MiB and more come from fastcnn's huge-page allocator (csrc/ops/cpu/output_allocator.h):
2 MiB-aligned, correct, and ordinary tensors in every other respect. FASTCNN_HUGE_PAGES=0 turns it off.
Freed ones are cached by size for the next output (FASTCNN_OUTPUT_CACHE_MB, default 1024 MiB)."""
import threading
import io
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastcnn
from fastcnn import _extension

HUGE_PAGE = 2 << 20

pytestmark = pytest.mark.skipif(
    _extension.build_info().get("huge_pages") != "1",
    reason="huge-page outputs are off here (FASTCNN_HUGE_PAGES=0, or no madvise on this platform)",
)


def large_outputs():
    """(name, fastcnn tensor, expected) for every kernel output that is at least 2 MiB."""
    x = torch.randn(4, 32, 64, 64, requires_grad=True)  # 2 MiB in fp32
    w = torch.randn(32, 1, 3, 3)
    y = fastcnn.ops.depthwise_conv2d(x, w, None, 1, 1)
    (grad_x,) = torch.autograd.grad(y, x, torch.ones_like(y))
    x_ref = x.detach().requires_grad_()
    y_ref = F.conv2d(x_ref, w, None, 1, 1, 1, 32)
    (grad_ref,) = torch.autograd.grad(y_ref, x_ref, torch.ones_like(y_ref))

    image = torch.randn(2, 3, 512, 512).to(memory_format=torch.channels_last).requires_grad_()
    theta = torch.tensor([[[0.9, 0.1, 0.05], [-0.1, 0.9, 0.0]]]).repeat(2, 1, 1)
    sampled = fastcnn.ops.affine_grid_sample(image, theta, (2, 3, 512, 512))
    (grad_image,) = torch.autograd.grad(sampled.sum(), image)
    image_ref = image.detach().requires_grad_()
    sampled_ref = F.grid_sample(image_ref, F.affine_grid(theta, (2, 3, 512, 512), align_corners=False),
                                align_corners=False)
    (grad_image_ref,) = torch.autograd.grad(sampled_ref.sum(), image_ref)
    nchw, channels_last = torch.contiguous_format, torch.channels_last
    return [
        ("depthwise output", y, y_ref, nchw),
        ("depthwise grad_input", grad_x, grad_ref, nchw),
        ("grid_sample output", sampled, sampled_ref, channels_last),
        ("grid_sample grad_input", grad_image, grad_image_ref, channels_last),
    ]


@pytest.mark.parametrize("index", range(4))
def test_large_outputs_are_huge_page_aligned_and_correct(index):
    name, got, expected, layout = large_outputs()[index]
    assert got.untyped_storage().nbytes() >= HUGE_PAGE, name
    assert got.data_ptr() % HUGE_PAGE == 0, f"{name} is not 2 MiB-aligned"
    # Loose: the ops' own tests hold them to PyTorch; here a wrong or stale buffer would be far off.
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    assert got.is_contiguous(memory_format=layout), name


def test_small_outputs_use_the_default_allocator():
    y = fastcnn.ops.depthwise_conv2d(torch.randn(1, 8, 16, 16), torch.randn(8, 1, 3, 3), None, 1, 1)
    assert y.untyped_storage().nbytes() < HUGE_PAGE
    y.add_(1)  # an ordinary writable tensor


def test_huge_page_tensor_behaves_like_any_other():
    y = fastcnn.ops.depthwise_conv2d(torch.randn(4, 32, 64, 64), torch.randn(32, 1, 3, 3), None, 1, 1)
    assert y.data_ptr() % HUGE_PAGE == 0
    before = y.clone()
    y.resize_(8, 32, 64, 64)  # grows through the storage's allocator: old values kept
    torch.testing.assert_close(y[:4], before, rtol=0, atol=0)
    y[4:] = 3.0
    buffer = io.BytesIO()
    torch.save(y, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer), y, rtol=0, atol=0)
    torch.testing.assert_close(torch.from_numpy(y.numpy()), y, rtol=0, atol=0)
    shared = y.clone().share_memory_()
    torch.testing.assert_close(shared, y, rtol=0, atol=0)
    del y  # freed through the allocator's own deleter


def test_environment_variable_turns_huge_pages_off():
    script = (
        "import torch, fastcnn\n"
        "from fastcnn import _extension\n"
        "print(_extension.build_info()['huge_pages'])\n"
    )
    env = dict(os.environ, FASTCNN_HUGE_PAGES="0")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "0"


def cache_stats():
    """(cached bytes, capacity bytes, hits, misses)"""
    return tuple(torch.ops.fastcnn._output_cache_stats())


def run_script(script, **env):
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, **env))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_freed_output_is_reused_and_overwritten():
    w = torch.randn(32, 1, 3, 3)
    first_x, second_x = torch.randn(4, 32, 64, 64), torch.randn(4, 32, 64, 64)
    first = fastcnn.ops.depthwise_conv2d(first_x, w, None, 1, 1)
    address = first.data_ptr()
    del first
    cached, capacity, hits, _ = cache_stats()
    assert 4 * 32 * 64 * 64 * 4 <= cached <= capacity
    second = fastcnn.ops.depthwise_conv2d(second_x, w, None, 1, 1)
    assert second.data_ptr() == address
    assert cache_stats()[2] == hits + 1
    torch.testing.assert_close(second, F.conv2d(second_x, w, None, 1, 1, 1, 32), rtol=1e-5, atol=1e-5)


def test_clear_hands_buffers_back():
    y = fastcnn.ops.depthwise_conv2d(torch.randn(4, 32, 64, 64), torch.randn(32, 1, 3, 3), None, 1, 1)
    del y
    assert cache_stats()[0] > 0
    torch.ops.fastcnn._output_cache_clear()
    assert cache_stats()[0] == 0


CACHE_SCRIPT = (
    "import torch, fastcnn\n"
    "w = torch.randn(32, 1, 3, 3)\n"
    "for _ in range(3):\n"
    "    y = fastcnn.ops.depthwise_conv2d(torch.randn(4, 32, 64, 64), w, None, 1, 1)\n"
    "    del y\n"
    "print(*torch.ops.fastcnn._output_cache_stats())\n"
)


def test_cache_size_zero_keeps_nothing():
    cached, capacity, hits, misses = map(int, run_script(CACHE_SCRIPT, FASTCNN_OUTPUT_CACHE_MB="0").split())
    assert (cached, capacity, hits, misses) == (0, 0, 0, 3)


def test_cache_keeps_no_more_than_its_capacity():
    # 2 MiB of room: the 2 MiB output fits; a 4 MiB one freed next is handed back.
    script = CACHE_SCRIPT + (
        "big = fastcnn.ops.depthwise_conv2d(torch.randn(8, 32, 64, 64), w, None, 1, 1)\n"
        "small = fastcnn.ops.depthwise_conv2d(torch.randn(4, 32, 64, 64), w, None, 1, 1)\n"
        "del small\n"
        "del big\n"
        "print(*torch.ops.fastcnn._output_cache_stats())\n"
    )
    cached, capacity, hits, misses = map(int, run_script(script, FASTCNN_OUTPUT_CACHE_MB="2").split())
    assert capacity == 2 << 20 and cached == 2 << 20
    assert hits == 3 and misses == 2  # the first small output and the big one came from the system


def test_full_cache_hands_back_its_oldest_buffers():
    # 4 MiB of room: the 2 MiB output cached first makes way for the 4 MiB one freed after it.
    script = CACHE_SCRIPT + (
        "big = fastcnn.ops.depthwise_conv2d(torch.randn(8, 32, 64, 64), w, None, 1, 1)\n"
        "del big\n"
        "print(*torch.ops.fastcnn._output_cache_stats())\n"
        "again = fastcnn.ops.depthwise_conv2d(torch.randn(8, 32, 64, 64), w, None, 1, 1)\n"
        "print(*torch.ops.fastcnn._output_cache_stats())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, FASTCNN_OUTPUT_CACHE_MB="4"))
    assert result.returncode == 0, result.stderr
    after_free, after_reuse = (tuple(map(int, line.split())) for line in result.stdout.strip().splitlines()[-2:])
    assert after_free == (4 << 20, 4 << 20, 2, 2)  # the big buffer alone
    assert after_reuse == (0, 4 << 20, 3, 2)  # and it served the next big output


def test_threads_share_the_cache_safely():
    w = torch.randn(32, 1, 3, 3)
    inputs = [torch.randn(2 + i % 3, 32, 64, 64) for i in range(8)]
    errors = []

    def work(x):
        try:
            for _ in range(20):
                y = fastcnn.ops.depthwise_conv2d(x, w, None, 1, 1)
                torch.testing.assert_close(y, F.conv2d(x, w, None, 1, 1, 1, 32), rtol=1e-5, atol=1e-5)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(x,)) for x in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_forked_child_starts_with_an_empty_cache():
    y = fastcnn.ops.depthwise_conv2d(torch.randn(4, 32, 64, 64), torch.randn(32, 1, 3, 3), None, 1, 1)
    del y
    assert cache_stats()[0] > 0
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its own cache, and kernels that still work
        try:
            torch.set_num_threads(1)  # GNU OpenMP's thread pool does not survive a fork
            cached = cache_stats()[0]
            x, w = torch.randn(4, 32, 64, 64), torch.randn(32, 1, 3, 3)
            ok = torch.allclose(fastcnn.ops.depthwise_conv2d(x, w, None, 1, 1), F.conv2d(x, w, None, 1, 1, 1, 32),
                                atol=1e-5)
            os.write(write, f"{cached} {int(ok)}".encode())
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert os.read(read, 100).decode() == "0 1"
