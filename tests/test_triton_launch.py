"""The Triton launchers' device guard and grid limits (kernels/_launch.py), without a GPU.

The launches themselves are tested in test_*_triton.py; here, that a launcher runs with its
tensors' CUDA device current (Triton launches on the current device, whatever the tensors'), and
that a shape too large for a kernel's grid is refused with a message before any launch. The guard
on real multi-GPU tensors is exercised by the `cuda` tests (test_*_cuda.py, two GPUs or more).
"""
import contextlib
import os
import sys

import pytest
import torch

pytest.importorskip("triton")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_interpreted"))
import working_tree_kernels  # noqa: E402

sys.path.pop(0)

launch = working_tree_kernels.load("_launch")
depthwise = working_tree_kernels.load("depthwise_conv2d")
grid_sample = working_tree_kernels.load("grid_sample")


class _FakeCudaTensor:
    def __init__(self, index):
        self.device = torch.device("cuda", index)


@pytest.fixture
def cuda_devices(monkeypatch):
    """Stands in for torch.cuda's device state: records the device current at each point."""
    state = {"current": 0, "entered": []}

    @contextlib.contextmanager
    def device(dev):
        previous = state["current"]
        state["current"] = torch.device(dev).index
        state["entered"].append(state["current"])
        try:
            yield
        finally:
            state["current"] = previous

    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "device", device)
    return state


@pytest.mark.parametrize("index,switches", [(1, [1]), (0, [])])
def test_launcher_runs_on_its_tensors_device(monkeypatch, cuda_devices, index, switches):
    tensor = _FakeCudaTensor(index)
    monkeypatch.setattr(launch, "_real_cuda_tensor", lambda args: tensor if tensor in args else None)
    seen = []

    @launch.on_tensor_device
    def launcher(x, value, scale=1):
        seen.append(torch.cuda.current_device())
        return value * scale

    assert launcher(tensor, 3, scale=2) == 6
    assert seen == [index] and cuda_devices["entered"] == switches
    assert cuda_devices["current"] == 0  # restored afterwards


def test_launcher_on_cpu_or_fake_tensors_touches_no_cuda_state(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    def no_cuda(*args, **kwargs):
        raise AssertionError("a CPU or fake launch asked for the CUDA device")

    monkeypatch.setattr(torch.cuda, "current_device", no_cuda)
    monkeypatch.setattr(torch.cuda, "device", no_cuda)
    x = torch.randn(1, 2, 5, 5)
    w = torch.randn(2, 1, 3, 3)
    assert launch._real_cuda_tensor((x, w)) is None
    with FakeTensorMode():
        fake = torch.empty(1, 2, 5, 5, device="cuda")
        assert launch._real_cuda_tensor((3, fake)) is None
        # The guarded launchers trace on fake CUDA tensors (what torch.compile runs).
        y = depthwise.forward(fake, torch.empty(2, 1, 3, 3, device="cuda"), None, [1, 1], [1, 1, 1, 1], [1, 1])
        assert y.shape == (1, 2, 5, 5)


def test_grid_limits():
    assert launch.grid(2**31 - 1, 65535, 65535, op="op", axis_meaning=("a", "b", "c")) == (2**31 - 1, 65535, 65535)
    with pytest.raises(ValueError, match=r"op \(Triton\): .*65536 program blocks along CUDA grid axis 2 \(c\)"):
        launch.grid(1, 1, 65536, op="op", axis_meaning=("a", "b", "c"))
    with pytest.raises(ValueError, match="grid axis 0"):
        launch.grid(2**31, 1, op="op", axis_meaning=("a", "b"))


def test_too_many_channels_for_the_grid_is_a_clear_error():
    # NCHW maps of 64x64 take 256-pixel tiles and 4 channels a program: 300000 channels need
    # 75000 blocks along grid axis 1. Meta tensors: nothing is allocated or launched.
    x = torch.empty(1, 300_000, 64, 64, device="meta")
    with pytest.raises(ValueError, match=r"depthwise_conv2d \(Triton\).*axis 1 \(channel blocks\).*'cuda' backend"):
        depthwise.forward(x, torch.empty(300_000, 1, 3, 3, device="meta"), None, [1, 1], [1, 1, 1, 1], [1, 1])
    with pytest.raises(ValueError, match=r"depthwise_conv2d \(Triton\).*axis 1 \(channel blocks\)"):
        depthwise.backward(x, x, torch.empty(300_000, 1, 3, 3, device="meta"), [1, 1], [1, 1, 1, 1], [1, 1],
                           [True, False, False])
    theta = torch.empty(1, 2, 3, device="meta")
    with pytest.raises(ValueError, match=r"grid_sample \(Triton\).*axis 1 \(channel blocks\)"):
        grid_sample.forward(x, None, theta, (64, 64), 0, 0, False)
    # An ordinary shape passes the checks (and traces on meta tensors).
    y = depthwise.forward(x[:, :64], torch.empty(64, 1, 3, 3, device="meta"), None, [1, 1], [1, 1, 1, 1], [1, 1])
    assert y.shape == (1, 64, 64, 64)


def test_deterministic_backward_sorts_in_runs_of_whole_images(monkeypatch):
    # torch.sort stops at 2**31 - 1 elements on CUDA; the deterministic backward's (sample, tap)
    # entries are sorted and searched a run of whole images at a time. Keys as the launcher writes
    # them: image n's in [n * (pixels + 1), (n + 1) * (pixels + 1)), the last its sentinel; ties
    # must keep entry order.
    generator = torch.Generator().manual_seed(3)
    images, per_image, pixels = 7, 24, 5
    keys = torch.randint(0, pixels + 1, (images, per_image), generator=generator, dtype=torch.int32)
    keys = (keys + (pixels + 1) * torch.arange(images, dtype=torch.int32)[:, None]).flatten()
    expected = grid_sample._sorted_entries(keys, images, per_image, pixels + 1)
    sorted_keys, perm = torch.sort(keys, stable=True)
    assert torch.equal(perm, expected[1]) and expected[0][-1] == keys.numel()
    assert torch.equal(expected[0], torch.searchsorted(sorted_keys, torch.arange(images * (pixels + 1) + 1,
                                                                                   dtype=torch.int32)))
    for limit in (per_image, 2 * per_image + 5, 3 * per_image):
        monkeypatch.setattr(grid_sample, "_MAX_SORT_ENTRIES", limit)
        offsets, runs_perm = grid_sample._sorted_entries(keys, images, per_image, pixels + 1)
        assert torch.equal(offsets, expected[0]) and torch.equal(runs_perm, expected[1]), limit
    monkeypatch.setattr(grid_sample, "_MAX_SORT_ENTRIES", per_image - 1)
    with pytest.raises(ValueError, match="sorts 24 entries for one image"):
        grid_sample._sorted_entries(keys, images, per_image, pixels + 1)


def test_memory_format_is_prims_suggest_memory_format():
    """The launchers' cached output format is exactly torch._prims_common.suggest_memory_format
    (what the ops' fake impls use), over dense, sliced, expanded and degenerate layouts."""
    from torch._prims_common import suggest_memory_format

    base = torch.randn(2, 3, 5, 4)
    cases = [
        base, base.to(memory_format=torch.channels_last), base[:, :1], base[:, :, ::2],
        base.to(memory_format=torch.channels_last)[..., 1:], base[:1].expand(3, 3, 5, 4),
        torch.randn(2, 1, 5, 4).to(memory_format=torch.channels_last), torch.randn(2, 3, 1, 1),
        torch.randn(0, 3, 5, 4), torch.randn(2, 3, 5, 4).permute(0, 1, 3, 2),
        torch.nn.Parameter(torch.randn(3, 1, 3, 3)),
    ]
    for t in cases:
        for _ in range(2):  # computed, then from the cache
            assert launch.memory_format(t) == suggest_memory_format(t), (t.shape, t.stride())
    assert launch.cdiv(7, 2) == 4 and launch.cdiv(8, 2) == 4 and launch.cdiv(0, 3) == 0
