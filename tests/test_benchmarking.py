"""The benchmark machinery (fastcnn.benchmarking), the depthwise cases and the `fastcnn` command:
interleaving and ratio math on fake providers with a fake clock, floors, the environment record,
`fastcnn info`, and a tiny `fastcnn bench` that writes JSON, markdown and PNG."""
import json
import math
import os
import statistics
import sys
import time

import pytest
import torch

import fastcnn
from fastcnn import benchmarking, cli
from fastcnn.bench_cases import depthwise


class FakeClock:
    """A timer that only moves when a fake provider 'works'."""

    def __init__(self):
        self.now = 0.0
        self.log = []

    def __call__(self):
        return self.now

    def provider(self, name, cost):
        def fn():
            self.log.append(name)
            self.now += cost() if callable(cost) else cost

        return benchmarking.Provider(name, fn)


def test_round_order_alternates():
    assert [benchmarking.round_order(3, r) for r in range(4)] == [[0, 1, 2], [2, 1, 0], [0, 1, 2], [2, 1, 0]]


def test_interleaved_rounds_and_ratios_on_a_fake_clock():
    clock = FakeClock()
    providers = [clock.provider("torch", 2e-3), clock.provider("ours", 1e-3), clock.provider("slow", 4e-3)]
    result = benchmarking.time_interleaved(
        providers, rounds=4, warmup=1, min_time=0.0, clock=benchmarking.WallClock(timer=clock)
    )
    # warm-up + one calibration call each, then ABC CBA ABC CBA.
    timed = clock.log[6:]
    assert timed == ["torch", "ours", "slow", "slow", "ours", "torch"] * 2
    assert result["torch"].times == pytest.approx([2e-3] * 4)
    assert result["ours"].median == pytest.approx(1e-3)
    assert result["torch"].ratio == pytest.approx(1.0)
    assert result["ours"].ratio == pytest.approx(2.0)  # twice as fast as the baseline
    assert result["slow"].ratio == pytest.approx(0.5)
    assert all(t.error is None and t.inner == 1 for t in result.values())


def test_calibration_repeats_short_calls_up_to_min_time():
    clock = FakeClock()
    result = benchmarking.time_interleaved(
        [clock.provider("torch", 1e-4)], rounds=2, warmup=0, min_time=1e-2, clock=benchmarking.WallClock(timer=clock)
    )
    assert result["torch"].inner == 100
    assert result["torch"].median == pytest.approx(1e-4)


def test_ratio_is_the_median_of_per_round_ratios_not_the_ratio_of_medians():
    # The machine gets slower round by round; within a round ours is always 2x faster.
    load = [1.0, 3.0, 1.2, 5.0, 1.1]
    times = {"torch": [2.0 * f for f in load], "ours": [1.0 * f for f in load]}
    times["ours"][0] = 4.0  # one disturbed measurement
    result = benchmarking.summarize(times)
    assert result["ours"].ratios == pytest.approx([0.5, 2.0, 2.0, 2.0, 2.0])
    assert result["ours"].ratio == pytest.approx(2.0)
    assert statistics.median(times["torch"]) / statistics.median(times["ours"]) == pytest.approx(0.8)


def test_a_failing_provider_is_reported_and_the_others_still_timed():
    clock = FakeClock()

    def broken():
        raise RuntimeError("kernel exploded\nsecond line")

    providers = [clock.provider("torch", 1e-3), benchmarking.Provider("broken", broken), clock.provider("ours", 5e-4)]
    result = benchmarking.time_interleaved(providers, rounds=3, min_time=0.0, clock=benchmarking.WallClock(timer=clock))
    assert result["broken"].error == "RuntimeError: kernel exploded"
    assert result["broken"].times == [] and result["broken"].ratio is None
    assert result["ours"].ratio == pytest.approx(2.0)
    assert list(result) == ["torch", "broken", "ours"]


def test_max_time_shrinks_the_rounds_but_not_below_min_rounds():
    clock = FakeClock()
    providers = [clock.provider("torch", 1.0), clock.provider("ours", 1.0)]
    result = benchmarking.time_interleaved(
        providers, rounds=20, min_rounds=3, max_time=6.0, min_time=0.0, clock=benchmarking.WallClock(timer=clock)
    )
    assert len(result["torch"].times) == 3
    result = benchmarking.time_interleaved(
        providers, rounds=20, min_rounds=2, max_time=1.0, min_time=0.0, clock=benchmarking.WallClock(timer=clock)
    )
    assert len(result["ours"].times) == 2


def test_context_is_entered_around_each_measurement():
    clock, entered = FakeClock(), []

    class Ctx:
        def __enter__(self):
            entered.append("in")

        def __exit__(self, *exc):
            entered.append("out")

    provider = clock.provider("torch", 1e-3)
    provider.context = Ctx
    benchmarking.time_interleaved([provider], rounds=3, warmup=0, min_time=0.0, clock=benchmarking.WallClock(timer=clock))
    assert entered == ["in", "out"] * 4  # calibration + 3 rounds


def _spin(seconds):
    def fn():
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    return fn


def test_real_clock_ratio_of_two_known_workloads():
    providers = [benchmarking.Provider("torch", _spin(2e-3)), benchmarking.Provider("half_speed", _spin(4e-3))]
    result = benchmarking.time_interleaved(providers, rounds=7, min_time=0.0)
    assert 0.3 < result["half_speed"].ratio < 0.7


def test_floors():
    bandwidth = benchmarking.copy_bandwidth("cpu")
    rate = benchmarking.matmul_rate("cpu", torch.float32)
    assert bandwidth > 1e8 and rate > 1e8
    assert benchmarking.floor_seconds(1e9, 0, "cpu") == pytest.approx(1e9 / bandwidth)
    assert benchmarking.floor_seconds(0, 1e12, "cpu") == pytest.approx(1e12 / rate)
    fl = benchmarking.floors("cpu")
    assert fl["copy_bandwidth_GBps"] == pytest.approx(bandwidth / 1e9)


def test_environment_record(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", benchmarking.REUSE_TUNABLES)
    monkeypatch.setenv("FASTCNN_CUDA_DEPTHWISE_CL", "rows")  # a kernel variant: in the record
    monkeypatch.setenv("UNRELATED_SETTING", "1")
    env = benchmarking.environment()
    assert env["env"]["FASTCNN_CUDA_DEPTHWISE_CL"] == "rows" and "UNRELATED_SETTING" not in env["env"]
    for key in ("torch", "torch_cuda", "triton", "cpu", "threads", "gpu", "build_info", "backends", "isa"):
        assert key in env
    assert env["threads"] == torch.get_num_threads()
    assert env["allocator"]["name"] == "reuse" and env["allocator"]["mmap_max_0"]
    assert env["backends"]["reference"]["available"]
    json.dumps(env)  # JSON-ready
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert benchmarking.allocator()["name"] == "default"


def test_depthwise_cases():
    shapes = depthwise.shapes()
    # 13 MobileNet v1 layers with the 5 identical ones once, and MobileNet v3's 6 5x5 layers as 4
    # shapes, at N=1 and 32; ConvNeXt-T's 18 7x7 layers as 4 shapes at N=8; then 7x7 and 31x31
    assert len(shapes) == 2 * 9 + 2 * 4 + 4 + 2
    assert len({(s.name, s.n) for s in shapes}) == len(shapes)
    assert {(s.c, s.h, s.stride) for s in shapes if s.name.startswith("mbv1")} == {
        (32, 112, 1), (64, 112, 2), (128, 56, 1), (128, 56, 2), (256, 28, 1), (256, 28, 2), (512, 14, 1),
        (512, 14, 2), (1024, 7, 1)}
    assert sum(s.repeat for s in shapes if s.n == 1 and s.name.startswith("mbv1")) == 13
    assert {(s.c, s.h, s.stride, s.k, s.padding, s.repeat) for s in shapes if s.name.startswith("mbv3")} == {
        (72, 56, 2, 5, 2, 1), (120, 28, 1, 5, 2, 2), (672, 14, 2, 5, 2, 1), (960, 7, 1, 5, 2, 2)}
    assert {(s.n, s.c, s.h, s.k, s.padding, s.bias, s.repeat) for s in shapes if s.name.startswith("convnext")} == {
        (8, 96, 56, 7, 3, True, 3), (8, 192, 28, 7, 3, True, 3), (8, 384, 14, 7, 3, True, 9),
        (8, 768, 7, 7, 3, True, 3)}
    summary = depthwise.SUMMARY
    assert {summary.group_of(s.name) for s in shapes} == {"mbv1", "mbv3 5x5", "convnext-t 7x7", None}
    quick = depthwise.shapes(quick=True)
    assert {s.n for s in quick if s.name.startswith("mbv1")} == {1} and "k31" not in {s.name for s in quick}
    assert not any(s.name.startswith("convnext") for s in quick)
    k31 = next(s for s in shapes if s.name == "k31")
    assert (k31.n, k31.c, k31.h, k31.padding, k31.out_hw) == (8, 128, 56, 15, (56, 56))
    # forward moves x, w and y once; 2 flops per multiply-add
    s = depthwise.Shape("t", 2, 3, 8, 8, 3, 2)
    assert s.out_hw == (4, 4)
    assert depthwise.cost(s, "forward", 4) == ((2 * 3 * 64 + 27 + 2 * 3 * 16) * 4, 2 * 2 * 3 * 16 * 9)
    fb = depthwise.cost(s, "forward+backward", 4)
    assert fb[1] == 3 * depthwise.cost(s, "forward", 4)[1]
    names = [p.name for p in depthwise.providers("cpu")]
    assert "torch" in names and "torch.compile" not in names and "fastcnn[reference]" not in names


def test_run_op_rows_and_errors():
    shapes = [depthwise.Shape("tiny", 2, 5, 9, 9, 3, 2, bias=True)]
    rows = benchmarking.run_op(depthwise, shapes=shapes, layouts=("channels_last",), rounds=2, min_time=0.0,
                               providers=["torch"])
    assert [(r["mode"], r["provider"]) for r in rows] == [("forward", "torch"), ("forward+backward", "torch")]
    fwd, fb = rows
    assert fwd["ratio"] == pytest.approx(1.0) and fwd["rounds"] == 2 and fwd["error"] is None
    assert fwd["max_abs_error"] < 1e-5 and set(fb["errors"]) == {"output", "grad_input", "grad_weight", "grad_bias"}
    assert fb["saved_bytes"] > 0 and fb["floor_fraction"] > 0
    # the floor's bandwidth is the copy timed in the case's own rounds, not a result row
    assert all(r["copy_bandwidth_GBps"] > 0.1 for r in rows)
    assert fwd["floor_ms"] == pytest.approx(fwd["bytes"] / (fwd["copy_bandwidth_GBps"] * 1e9) * 1e3)


def test_round_floor_fractions_pair_each_round_with_its_copy():
    # 1 GB copied a call; rounds at 1 s and 2 s a copy (1 and 0.5 GB/s) and a case of 0.5 GB
    # taking 1 s both times: floors 0.5 s and 1 s, fractions 0.5 and 1.0, median 0.75.
    got = benchmarking.round_floor_fractions(0.5e9, 0, 1e9, [1.0, 2.0], [1.0, 1.0], "cpu")
    assert got == pytest.approx(0.75)
    # a round where neighbours slowed the copy and the case alike keeps its fraction (0.5, 0.5,
    # 1/6: median 0.5); the ratio of the medians would say 0.5 / 2 = 0.25
    got = benchmarking.round_floor_fractions(0.5e9, 0, 1e9, [1.0, 2.0, 1.0], [1.0, 2.0, 3.0], "cpu")
    assert got == pytest.approx(0.5)
    assert benchmarking.round_floor_fractions(1e9, 0, 1e9, [1.0], [], "cpu") is None


def test_make_call_forward_backward_does_not_accumulate():
    args, grad = benchmarking.case_inputs(depthwise, depthwise.Shape("t", 1, 4, 6, 6, 3, 1))
    prep = benchmarking.prepare(args, grad, "forward+backward", "nchw", "cpu", torch.float32)
    call = benchmarking.make_call(depthwise._torch, prep, "forward+backward")
    call()
    first = prep.args[0].grad.clone()
    call()
    torch.testing.assert_close(prep.args[0].grad, first)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cli_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for text in ("torch", "backends:", "reference", "avx2", "GPU", "allocator"):
        assert text in out
    assert cli.main(["info", "--json"]) == 0
    assert "torch" in json.loads(capsys.readouterr().out)


def test_cli_bench_smoke_writes_json_markdown_png(tmp_path, capsys, restore_threads):
    out = tmp_path / "out"
    argv = ["bench", "--device", "cpu", "--cases", "mbv1-dw13", "--batch", "1", "--rounds", "2", "--min-time",
            "0.0005", "--threads", "1", "--providers", "torch", "--out", str(out)]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    assert "mbv1-dw13" in table and "× torch" in table
    record = json.loads((out / "depthwise.json").read_text())
    assert record["schema"] == benchmarking.SCHEMA
    assert record["runs"][0]["environment"]["threads"] == 1
    assert record["runs"][0]["floors"]["copy_bandwidth_GBps"] > 0
    results = record["results"]
    assert len(results) == 2 * 2  # 2 layouts x 2 modes x 1 provider
    assert {(r["layout"], r["mode"]) for r in results} == {
        (l, m) for l in ("nchw", "channels_last") for m in ("forward", "forward+backward")}
    assert all(r["ratio"] == pytest.approx(1.0) and r["time_ms"] > 0 and r["error"] is None for r in results)
    assert (out / "depthwise.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "depthwise.md").read_text().startswith("### fastcnn benchmark: depthwise")

    assert cli.main(["report", str(out / "depthwise.json")]) == 0
    md = capsys.readouterr().out
    assert "| case | shape | layout | mode | torch ms (default) |" in md
    assert md.count("| mbv1-dw13 |") == 4
    assert cli.main(["report", "--long", str(out / "depthwise.json"), "-o", str(tmp_path / "long.md")]) == 0
    assert (tmp_path / "long.md").read_text().count("| depthwise | mbv1-dw13 |") == 4


def test_report_merges_allocators_side_by_side():
    row = {"op": "depthwise", "case": "c", "shape": "s", "layout": "nchw", "mode": "forward", "time_ms": 1.0,
           "max_abs_error": 0.0, "floor_fraction": 0.5, "error": None}
    results = []
    for alloc, ratio in (("default", 1.5), ("reuse", 2.5)):
        results += [dict(row, provider="torch", ratio=1.0, allocator=alloc),
                    dict(row, provider="fastcnn[cpu]", ratio=ratio, allocator=alloc)]
    md = cli.render_markdown({"settings": {"device": "cpu", "dtype": "float32"}, "runs": [], "results": results})
    assert "fastcnn[cpu] × (default / reuse)" in md and "| 1.50 / 2.50 | 50% / 50% |" in md


def test_report_updates_a_table_between_markers(tmp_path):
    doc = "# x\n<!-- fastcnn-bench:depthwise -->\nold\n<!-- /fastcnn-bench:depthwise -->\ntail\n"
    assert cli.update_between_markers(doc, "depthwise", "| new |\n") == (
        "# x\n<!-- fastcnn-bench:depthwise -->\n| new |\n<!-- /fastcnn-bench:depthwise -->\ntail\n")
    with pytest.raises(SystemExit):
        cli.update_between_markers(doc, "other", "x")


def test_report_update_without_markers_leaves_the_file_alone(tmp_path):
    """A missing marker pair is an error that must not truncate the document (it once emptied
    the README)."""
    results = tmp_path / "depthwise.json"
    results.write_text(json.dumps({"settings": {"device": "cpu", "dtype": "float32"}, "runs": [], "results": []}))
    readme = tmp_path / "README.md"
    readme.write_text("# title\nno markers here\n")
    with pytest.raises(SystemExit):
        cli.main(["report", str(results), "--update", str(readme)])
    assert readme.read_text() == "# title\nno markers here\n"


def test_allocator_child_environment_and_argv(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0:glibc.pthread.rseq=0")
    assert cli._child_env("default")["GLIBC_TUNABLES"] == "glibc.pthread.rseq=0"
    reuse = cli._child_env("reuse")["GLIBC_TUNABLES"]
    assert "glibc.pthread.rseq=0" in reuse and benchmarking.REUSE_TUNABLES in reuse
    argv = ["bench", "--allocator", "both", "--out=x", "--quick"]
    assert cli._strip_options(argv, ("--allocator", "--out")) == ["bench", "--quick"]


def test_python_m_fastcnn(monkeypatch, capsys):
    import runpy

    monkeypatch.setattr(sys, "argv", ["fastcnn", "info", "--json"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("fastcnn", run_name="__main__")
    assert exit_.value.code == 0
    assert json.loads(capsys.readouterr().out)["torch"] == torch.__version__


def test_report_geometric_mean_over_a_models_layers_weights_repeats():
    def row(case, ratio, repeat, allocator):
        return {"op": "depthwise", "case": case, "shape": "s", "params": {"N": 32, "repeat": repeat},
                "layout": "nchw", "mode": "forward", "provider": "fastcnn[cpu]", "ratio": ratio,
                "allocator": allocator, "time_ms": 1.0, "floor_fraction": 0.5, "error": None}

    results = [row("mbv1-a", 2.0, 1, "default"), row("mbv1-b", 8.0, 3, "default"), row("k7", 100.0, 1, "default")]
    md = cli.render_markdown({"settings": {"device": "cpu", "dtype": "float32"}, "runs": [], "results": results})
    # (2 * 8^3)^(1/4) = 5.66; the single-case k7 is no model and stays out of the summary
    assert "| mbv1 | 32 | nchw | forward | 5.66 |" in md
    assert "| k7 |" not in md.split("Geometric means")[1]


# ------------------------------------------------------------------------------------------------
# The Spatial Transformer sampler cases (fastcnn.bench_cases.grid_sample)

from fastcnn import bench_cases  # noqa: E402
from fastcnn.bench_cases import grid_sample  # noqa: E402


def test_grid_sample_cases_are_the_issues_shapes():
    shapes = grid_sample.shapes()
    assert [(s.n, s.c, s.h, s.w) for s in shapes] == [(64, 1, 28, 28), (32, 3, 64, 64), (8, 3, 224, 224),
                                                       (32, 64, 56, 56)]
    assert len({s.name for s in shapes}) == 4 and all(s.size == (s.n, s.c, s.h, s.w) for s in shapes)
    assert {(s.mode, s.padding_mode, s.align_corners) for s in shapes} == {("bilinear", "zeros", False)}
    assert grid_sample.shapes(quick=True) == shapes[:3]
    assert [(s.name, s.n) for s in grid_sample.shapes(quick=True, batches=[2])] == [(s.name, 2) for s in shapes[:3]]
    assert bench_cases.get("grid_sample") is grid_sample and grid_sample.OP == "grid_sample"
    assert set(bench_cases.names()) >= {"depthwise", "grid_sample"}


def test_grid_sample_summary_is_the_first_three_shapes():
    summary = grid_sample.SUMMARY
    first_three = [s.name for s in grid_sample.shapes()[:3]]
    assert list(summary.groups.values()) == [tuple(first_three)]
    label = next(iter(summary.groups))
    assert [summary.group_of(s.name) for s in grid_sample.shapes()] == [label] * 3 + [None]
    assert summary.expected(label) == 3 and not summary.by_batch
    assert bench_cases.summary("grid_sample") is summary and bench_cases.summary("no-such-op") is None
    dw = bench_cases.summary("depthwise")
    assert dw.by_batch and dw.group_of("mbv1-dw3") == "mbv1" and dw.group_of("k7") is None
    assert dw.expected("mbv1") is None  # a glob: the group's size is not known


def test_grid_sample_inputs_theta_near_identity_and_reference():
    shape = grid_sample.Shape("t", 16, 2, 9, 7)
    x, theta, size, mode, padding_mode, align_corners = grid_sample.make_inputs(shape, torch.Generator().manual_seed(0))
    assert x.shape == (16, 2, 9, 7) and theta.shape == (16, 2, 3) and theta.dtype == torch.float32
    assert (size, mode, padding_mode, align_corners) == ((16, 2, 9, 7), "bilinear", "zeros", False)
    a = theta[:, :, :2].double()
    scale = torch.linalg.det(a).sqrt()
    angle = torch.atan2(a[:, 1, 0], a[:, 0, 0])
    assert ((scale >= 0.8 - 1e-6) & (scale <= 1.2 + 1e-6)).all()
    assert (angle.abs() <= math.radians(30) + 1e-6).all() and (theta[:, :, 2].abs() <= 0.2 + 1e-6).all()
    torch.testing.assert_close(a[:, 0, 0], a[:, 1, 1]) and torch.testing.assert_close(a[:, 0, 1], -a[:, 1, 0])
    assert theta.std(0).min() > 0  # one θ per sample
    again = grid_sample.make_inputs(shape, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], x) and torch.equal(again[1], theta)  # a fixed generator: fixed inputs
    args, grad = benchmarking.case_inputs(grid_sample, shape)
    assert grad.shape == x.shape  # output size = input size
    torch.testing.assert_close(grid_sample.reference(*args), grid_sample._torch(*args))


def test_grid_sample_cost():
    s = grid_sample.Shape("t", 2, 3, 4, 5)
    e = 2 * 3 * 4 * 5
    assert grid_sample.cost(s, "forward", 4) == (2 * e * 4, 8 * e)
    assert grid_sample.cost(s, "backward", 2) == (3 * e * 2, 24 * e)
    assert grid_sample.cost(s, "forward+backward", 4) == (5 * e * 4, 32 * e)
    # theta's gradient alone: grad_input is neither written nor computed.
    assert grid_sample.cost(s, "forward+backward[theta]", 4) == (4 * e * 4, 24 * e)
    with pytest.raises(ValueError):
        grid_sample.cost(s, "sideways", 4)


def test_prepare_differentiates_only_the_named_argument():
    args, grad = benchmarking.case_inputs(grid_sample, grid_sample.Shape("t", 2, 1, 5, 5))
    prep = benchmarking.prepare(args, grad, "forward+backward[theta]", "nchw", "cpu", torch.float32,
                                grid_sample.ARG_NAMES)
    assert [a.requires_grad for a in prep.args[:2]] == [False, True] and len(prep.grad_args) == 1
    with pytest.raises(ValueError, match="not among"):
        benchmarking.prepare(args, grad, "forward+backward[grid]", "nchw", "cpu", torch.float32,
                             grid_sample.ARG_NAMES)


def test_prepare_lays_out_one_channel_tensors_by_their_strides():
    # With one channel both layouts are contiguous; the case must still hand the providers a tensor
    # laid out channels_last (stride 1 between channels), or every provider runs its NCHW path.
    args, grad = benchmarking.case_inputs(grid_sample, grid_sample.Shape("t", 2, 1, 5, 5))
    for layout, channel_stride in (("channels_last", 1), ("nchw", 25)):
        prep = benchmarking.prepare(args, grad, "forward+backward", layout, "cpu", torch.float32, grid_sample.ARG_NAMES)
        assert prep.args[0].stride(1) == channel_stride and prep.grad_output.stride(1) == channel_stride
        assert prep.args[1].shape == (2, 2, 3)  # theta, 3-D: left alone
    wide = benchmarking.to_layout(torch.randn(2, 3, 4, 4), "channels_last")
    assert wide.is_contiguous(memory_format=torch.channels_last) and not wide.is_contiguous()


def test_grid_sample_errors_are_measured_in_fp64_on_every_device():
    # grad_theta is a long fp32 sum in PyTorch too: an fp32 reference would not be ground truth
    assert benchmarking.reference_dtype("cpu", torch.float32, grid_sample) == torch.float64
    assert benchmarking.reference_dtype("cpu", torch.float32, depthwise) == torch.float32
    assert benchmarking.reference_dtype("cpu", torch.float32) == torch.float32


def test_grid_sample_providers(monkeypatch):
    names = [p.name for p in grid_sample.providers("cpu")]
    assert names[-1] == "torch" and "torch.compile" not in names and "fastcnn[reference]" not in names
    assert all(f"{n[:-1]},deterministic]" in names for n in names if n.startswith("fastcnn[") and "," not in n)
    monkeypatch.setattr(benchmarking, "fastcnn_backends", lambda device: ["cuda", "triton"])
    assert [p.name for p in grid_sample.providers("cuda")] == [
        "fastcnn[cuda]", "fastcnn[cuda,deterministic]", "fastcnn[triton]", "fastcnn[triton,deterministic]",
        "fastcnn[cuda,deterministic,sort32]", "fastcnn[cuda,deterministic,gather]", "torch"]


def test_deterministic_context_sets_and_restores_the_global_setting():
    import torch.utils.deterministic as deterministic

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              deterministic.fill_uninitialized_memory)
    with benchmarking.fastcnn_context("reference")():
        assert not torch.are_deterministic_algorithms_enabled()
    with benchmarking.fastcnn_context("reference", deterministic=True)():
        import fastcnn

        assert torch.are_deterministic_algorithms_enabled() and fastcnn.backends.requested() == "reference"
        assert not deterministic.fill_uninitialized_memory  # torch.empty's NaN fill is not billed
    with pytest.raises(RuntimeError):
        with benchmarking.fastcnn_context("reference", deterministic=True)():
            raise RuntimeError("boom")
    after = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             deterministic.fill_uninitialized_memory)
    assert after == before


@pytest.fixture
def grid_sample_op(monkeypatch):
    """fastcnn.ops.affine_grid_sample replaced by the reference, recording whether each call ran
    under deterministic algorithms; fastcnn[reference] offered so the test needs no fastcnn._C."""
    import fastcnn
    from fastcnn import reference

    calls = []

    def op(*args):
        calls.append(torch.are_deterministic_algorithms_enabled())
        return reference.affine_grid_sample(*args)

    monkeypatch.setattr(fastcnn.ops, "affine_grid_sample", op, raising=False)
    monkeypatch.setattr(benchmarking, "fastcnn_backends", lambda device: ["reference"])
    return calls


def test_grid_sample_run_op_rows_errors_and_deterministic_provider(grid_sample_op):
    shapes = [grid_sample.Shape("tiny", 3, 2, 7, 6)]
    rows = benchmarking.run_op(grid_sample, shapes=shapes, layouts=("channels_last",), rounds=2, min_time=0.0)
    # Determinism changes only the backward: its provider is not raced in the forward.
    assert [(r["mode"], r["provider"]) for r in rows] == [("forward", "fastcnn[reference]"), ("forward", "torch")] + [
        ("forward+backward", p) for p in ("fastcnn[reference]", "fastcnn[reference,deterministic]", "torch")] + [
        ("forward+backward[theta]", p) for p in ("fastcnn[reference]", "torch")]
    assert all(r["error"] is None and r["max_rel_error"] < 1e-5 and r["rounds"] == 2 for r in rows)
    fb = [r for r in rows if r["mode"] == "forward+backward"]
    assert all(set(r["errors"]) == {"output", "grad_input", "grad_theta"} for r in fb)
    # The STN step: theta alone needs a gradient, so the input's is neither computed nor checked.
    step = [r for r in rows if r["mode"] == "forward+backward[theta]"]
    assert all(set(r["errors"]) == {"output", "grad_theta"} for r in step)
    # The deterministic provider ran the op under deterministic algorithms, the plain one without.
    assert set(grid_sample_op) == {True, False}
    assert not torch.are_deterministic_algorithms_enabled()


def _stn_row(case, provider, ratio, times, n=8, allocator="default", layout="nchw", mode="forward+backward"):
    return {"op": "grid_sample", "case": case, "shape": f"{n}x3", "params": {"N": n}, "layout": layout,
            "mode": mode, "provider": provider, "ratio": ratio, "allocator": allocator, "time_ms": times[1],
            "times_ms": times, "floor_fraction": 0.5, "max_abs_error": 0.0, "error": None}


def test_report_grid_sample_headline_geomean_and_cost_of_determinism():
    results = []
    for case, n, ratio in (("mnist28", 64, 2.0), ("rgb64", 32, 4.0), ("imagenet224", 8, 8.0), ("feat56", 32, 1000.0)):
        results += [_stn_row(case, "torch", 1.0, [2.0, 2.0, 2.0], n),
                    _stn_row(case, "fastcnn[cuda]", ratio, [1.0, 1.0, 1.0], n),
                    _stn_row(case, "fastcnn[cuda,deterministic]", ratio / 2, [1.0, 1.5, 2.0], n)]
    record = {"settings": {"device": "cuda", "dtype": "float32"}, "runs": [], "results": results}
    md = cli.render_markdown(record)
    # (2 * 4 * 8)^(1/3) = 4: feat56 stays out of the headline
    assert "| STN shapes (first three) | 64/32/8 | nchw | forward+backward | 4.00 | 2.00 |" in md
    assert "| cases | batch | layout | mode | fastcnn[cuda] × (default) |" in md
    # median of the per-round ratios 1.0, 1.5, 2.0
    assert "| mnist28 | 64x3 | nchw | forward+backward | 1.50 |" in md
    assert "fastcnn[cuda] deterministic / default" in md
    plain = cli.render_summaries(results)
    assert "STN shapes (first three)" in plain and "4.00" in plain and "1.50" in plain
    partial = [r for r in results if r["case"] != "rgb64"]
    assert "| STN shapes (first three) (2 of 3 cases) |" in cli.render_markdown(dict(record, results=partial))


def test_cli_bench_grid_sample_and_all_ops(tmp_path, capsys, restore_threads, grid_sample_op):
    out = tmp_path / "out"
    argv = ["bench", "--op", "grid_sample", "--device", "cpu", "--cases", "mnist28", "--batch", "2", "--rounds", "2",
            "--min-time", "0.0005", "--threads", "1", "--layouts", "nchw", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "fastcnn[reference,deterministic]" in printed and "STN shapes (first three) (1 of 3 cases)" in printed
    record = json.loads((out / "grid_sample.json").read_text())
    assert {(r["mode"], r["provider"]) for r in record["results"]} == {
        (m, p) for m in ("forward", "forward+backward", "forward+backward[theta]")
        for p in ("fastcnn[reference]", "fastcnn[reference,deterministic]", "torch")
        if m == "forward+backward" or "deterministic" not in p}
    assert all(r["error"] is None for r in record["results"])
    assert (out / "grid_sample.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "deterministic / default" in (out / "grid_sample.md").read_text()
    assert not (out / "depthwise.json").exists()
    # No --op: every op, each into its own files.
    both = tmp_path / "both"
    argv = ["bench", "--device", "cpu", "--cases", "mnist28", "mbv1-dw13", "--batch", "1", "--rounds", "2",
            "--min-time", "0.0005", "--threads", "1", "--layouts", "nchw", "--modes", "forward",
            "forward+backward[theta]", "--providers", "torch", "--no-plot", "--out", str(both)]
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert sorted(p.name for p in both.iterdir()) == ["depthwise.json", "depthwise.md", "grid_sample.json",
                                                       "grid_sample.md"]
    # A mode naming an argument runs for the ops that have it: grid_sample's theta, not depthwise.
    modes = {op: {r["mode"] for r in json.loads((both / f"{op}.json").read_text())["results"]}
             for op in ("depthwise", "grid_sample")}
    assert modes == {"depthwise": {"forward"}, "grid_sample": {"forward", "forward+backward[theta]"}}
    with pytest.raises(SystemExit):
        cli.main(["bench", "--modes", "forward[theta]"])
    # No op here has the argument: nothing to run, said so instead of writing empty results.
    with pytest.raises(SystemExit, match="nothing of depthwise"):
        cli.main(["bench", "--op", "depthwise", "--device", "cpu", "--modes", "forward+backward[theta]",
                  "--out", str(tmp_path / "none")])
    assert not list((tmp_path / "none").glob("*.json"))


def test_reference_of_a_half_precision_run_starts_from_its_rounded_inputs():
    # Else fp16 theta alone moves a sample by a tenth of a pixel and the error column measures
    # the rounding of the inputs for every provider, PyTorch included.
    shape = grid_sample.Shape("t", 2, 3, 9, 7)
    args, grad = benchmarking.case_inputs(grid_sample, shape)
    ref = benchmarking.reference_outputs(grid_sample, args, grad, with_grad=True, device="cpu", dtype=torch.float64,
                                         input_dtype=torch.float16)
    rounded = [a.half() if isinstance(a, torch.Tensor) else a for a in args]
    expected = benchmarking.reference_outputs(grid_sample, rounded, grad.half(), with_grad=True, device="cpu",
                                              dtype=torch.float64)
    assert ref.keys() == expected.keys()
    assert all(torch.equal(ref[k], expected[k]) for k in ref)
    plain = benchmarking.reference_outputs(grid_sample, args, grad, with_grad=False, device="cpu", dtype=torch.float64)
    assert not torch.equal(plain["output"], ref["output"])


def test_cli_bench_keeps_each_op_as_it_finishes_and_names_other_dtypes(tmp_path, capsys, monkeypatch, restore_threads):
    # A crash in a later op (a first run on a new GPU) must not lose the earlier ones' files.
    out = tmp_path / "out"
    real = benchmarking.run_op

    def run_op(op, **kwargs):
        if op is grid_sample:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(op, **kwargs)

    monkeypatch.setattr(benchmarking, "run_op", run_op)
    argv = ["bench", "--device", "cpu", "--cases", "mbv1-dw13", "mnist28", "--batch", "1", "--rounds", "2",
            "--min-time", "0.0005", "--threads", "1", "--providers", "torch", "--layouts", "nchw", "--modes",
            "forward", "--dtype", "bfloat16", "--no-plot", "--out", str(out)]
    with pytest.raises(RuntimeError, match="illegal memory access"):
        cli.main(argv)
    record = json.loads((out / "depthwise-bfloat16.json").read_text())
    assert record["settings"]["dtype"] == "bfloat16" and len(record["results"]) == 1
    assert not (out / "depthwise.json").exists() and not (out / "grid_sample-bfloat16.json").exists()


def test_allocator_setting_is_ignored_off_the_cpu(monkeypatch, tmp_path, capsys):
    seen = {}
    monkeypatch.setattr(cli, "_bench_here", lambda args, on_record=None: seen.setdefault("args", args) and {})
    monkeypatch.setattr(cli, "_bench_in_children", lambda args, argv: pytest.fail("children on a GPU run"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli.main(["bench", "--allocator", "both", "--no-plot", "--quiet", "--out", str(tmp_path)]) == 0
    assert seen["args"].allocator == "current"
    assert "ignored" in capsys.readouterr().err


def test_a_lost_cuda_context_stops_the_run_but_an_ordinary_failure_does_not():
    class Device:
        type = "cuda"

    def boom(message):
        def fn():
            raise RuntimeError(message)

        return fn

    prep = benchmarking.Prepared([], [], None)
    info = benchmarking._check_call(None, boom("CUDA error: invalid argument"), prep, None, "forward",
                                    torch.device("cpu"), None)
    assert "invalid argument" in info["error"]
    with pytest.raises(RuntimeError, match="illegal memory access"):
        benchmarking._check_call(None, boom("CUDA error: an illegal memory access was encountered"), prep, None,
                                 "forward", Device(), lambda: _no_sync())
    assert benchmarking._context_lost(RuntimeError("CUDA error: device-side assert triggered"))
    assert not benchmarking._context_lost(RuntimeError("CUDA error: out of memory"))


def _no_sync():
    """Stands in for a provider context on the fake CUDA device: turns off the synchronisation."""
    import contextlib
    import unittest.mock

    stack = contextlib.ExitStack()
    stack.enter_context(unittest.mock.patch.object(torch.cuda, "synchronize", lambda: None))
    stack.enter_context(unittest.mock.patch.object(torch.cuda, "reset_peak_memory_stats", lambda: None))
    stack.enter_context(unittest.mock.patch.object(torch.cuda, "memory_allocated", lambda: 0))
    return stack


def test_env_context_sets_and_restores_variables(monkeypatch):
    monkeypatch.setenv("FASTCNN_TEST_KEPT", "before")
    monkeypatch.delenv("FASTCNN_TEST_NEW", raising=False)
    context = benchmarking.fastcnn_context("reference", env={"FASTCNN_TEST_KEPT": "inside", "FASTCNN_TEST_NEW": "1"})
    with pytest.raises(RuntimeError):
        with context():
            assert os.environ["FASTCNN_TEST_KEPT"] == "inside" and os.environ["FASTCNN_TEST_NEW"] == "1"
            raise RuntimeError("boom")
    assert os.environ["FASTCNN_TEST_KEPT"] == "before" and "FASTCNN_TEST_NEW" not in os.environ


def test_opt_in_cuda_kernel_providers_run_their_layout_only(monkeypatch):
    monkeypatch.setattr(benchmarking, "fastcnn_backends", lambda device: ["cuda", "triton"])
    specs = {p.name: p for p in depthwise.providers("cuda")}
    rows = specs["fastcnn[cuda,cl-rows]"]
    assert rows.runs("forward", "channels_last") and rows.runs("forward+backward", "channels_last")
    assert not rows.runs("forward", "nchw") and specs["fastcnn[cuda]"].runs("forward", "nchw")
    with rows.context():
        assert os.environ["FASTCNN_CUDA_DEPTHWISE_CL"] == "rows"
    vec = specs["fastcnn[cuda,nchw-vec]"]
    assert vec.runs("forward", "nchw") and not vec.runs("forward", "channels_last")
    with vec.context():
        assert os.environ["FASTCNN_CUDA_DEPTHWISE_NCHW"] == "vec"
    monkeypatch.setattr(benchmarking, "fastcnn_backends", lambda device: ["cpu"])
    assert "fastcnn[cuda,cl-rows]" not in [p.name for p in depthwise.providers("cpu")]


@pytest.mark.skipif(not fastcnn._extension.has_ops(), reason="fastcnn._C is not built")
def test_profile_kernels_script_runs_on_cpu(tmp_path):
    """bench/profile_kernels.py (the GPU session's per-kernel breakdown) on the CPU, one STN shape."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "profile_kernels.py")
    spec = importlib.util.spec_from_file_location("profile_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--device", "cpu", "--quick", "--steps", "1", "--ops", "grid_sample", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "profile-float32.json").read_text())
    providers = {c["provider"]: c for c in record["cases"]}
    assert set(providers) == {"fastcnn", "fastcnn deterministic", "torch"}
    assert all("error" not in c and c["kernels"] for c in providers.values())
    names = {k["name"] for k in providers["fastcnn"]["kernels"]}
    assert {"fastcnn::affine_grid_sample", "fastcnn::_affine_grid_sample_backward"} <= names
    assert "| grid_sample mnist28" in (tmp_path / "profile-float32.md").read_text()
