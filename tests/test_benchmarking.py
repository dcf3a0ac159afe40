"""The benchmark machinery (fastcnn.benchmarking), the depthwise cases and the `fastcnn` command:
interleaving and ratio math on fake providers with a fake clock, floors, the environment record,
`fastcnn info`, and a tiny `fastcnn bench` that writes JSON, markdown and PNG."""
import json
import statistics
import sys
import time

import pytest
import torch

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
    env = benchmarking.environment()
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
    assert len(shapes) == 2 * 9 + 2  # 13 MobileNet v1 layers with the 5 identical ones once, N=1 and 32
    assert len({(s.name, s.n) for s in shapes}) == len(shapes)
    assert {(s.c, s.h, s.stride) for s in shapes if s.name.startswith("mbv1")} == {
        (32, 112, 1), (64, 112, 2), (128, 56, 1), (128, 56, 2), (256, 28, 1), (256, 28, 2), (512, 14, 1),
        (512, 14, 2), (1024, 7, 1)}
    assert sum(s.repeat for s in shapes if s.n == 1) == 13
    quick = depthwise.shapes(quick=True)
    assert {s.n for s in quick if s.name.startswith("mbv1")} == {1} and "k31" not in {s.name for s in quick}
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
    assert "fastcnn[cpu] × (default / reuse)" in md and "| 1.50 / 2.50 | 50% |" in md


def test_report_updates_a_table_between_markers(tmp_path):
    doc = "# x\n<!-- fastcnn-bench:depthwise -->\nold\n<!-- /fastcnn-bench:depthwise -->\ntail\n"
    assert cli.update_between_markers(doc, "depthwise", "| new |\n") == (
        "# x\n<!-- fastcnn-bench:depthwise -->\n| new |\n<!-- /fastcnn-bench:depthwise -->\ntail\n")
    with pytest.raises(SystemExit):
        cli.update_between_markers(doc, "other", "x")


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
