"""The pytest-benchmark driver shared by bench/bench_<op>.py: one test per case x layout x mode x
provider of a fastcnn.bench_cases module, grouped by case x layout x mode so the table compares
the providers; the cases and providers are the ones `fastcnn bench --op <op>` races."""
import contextlib
import functools

import torch

from fastcnn import benchmarking


def parametrize(metafunc, op):
    """pytest_generate_tests for a bench file over the cases of `op`."""
    if "provider" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = torch.device(config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = op.shapes(quick=config.getoption("--bench-quick"))
    specs = op.providers(device, compile=config.getoption("bench_compile"))
    params, ids = [], []
    for shape in shapes:
        for layout in op.LAYOUTS:
            for mode in op.MODES:
                for name in [p.name for p in specs if p.runs(mode)]:
                    params.append((shape, layout, mode, name))
                    ids.append(f"{shape.name}-N{shape.n}-{layout}-{mode}-{name}")
    metafunc.parametrize(("shape", "layout", "mode", "provider"), params, ids=ids)


@functools.lru_cache(maxsize=2)
def _reference(op, shape, device, dtype):
    """Inputs and the reference's output and gradients, once per shape (tests run shape by shape)."""
    args, grad_output = benchmarking.case_inputs(op, shape)
    ref = benchmarking.reference_outputs(
        op, args, grad_output, with_grad=True, device=device, dtype=benchmarking.reference_dtype(device, dtype, op),
        input_dtype=dtype,
    )
    return args, grad_output, ref


def run(benchmark, op, device, dtype, shape, layout, mode, provider):
    """Times one provider on one case, after checking its error against the reference."""
    spec = next(p for p in op.providers(device, compile=provider == "torch.compile") if p.name == provider)
    args, grad_output, ref = _reference(op, shape, device, dtype)
    prep = benchmarking.prepare(args, grad_output, mode, layout, device, dtype, op.ARG_NAMES)
    fn = benchmarking.make_call(spec.fn, prep, mode)
    timed = fn
    if device.type == "cuda":  # pytest-benchmark reads a wall clock: wait for the GPU in the call

        def timed():
            fn()
            torch.cuda.synchronize()

    benchmark.group = f"{op.OP} {shape.name} {shape.label} {layout} {mode}"
    with spec.context() if spec.context else contextlib.nullcontext():
        out = fn()  # warm-up (torch.compile compiles here) and the error check
        errs = benchmarking.errors(op, out, prep, ref, mode)
        del out
        benchmark(timed)
    nbytes, flops = op.cost(shape, mode, torch.empty((), dtype=dtype).element_size())
    floor = benchmarking.floor_seconds(nbytes, flops, device, dtype)
    benchmark.extra_info.update({
        "provider": provider, "case": shape.name, "shape": shape.label, "layout": layout, "mode": mode,
        "max_abs_error": max(errs.values()), "bytes": nbytes, "flops": flops, "floor_ms": floor * 1e3,
    })
    try:
        benchmark.extra_info["floor_fraction"] = floor / benchmark.stats.stats.median
    except (AttributeError, ZeroDivisionError):  # --benchmark-disable: no stats
        pass
