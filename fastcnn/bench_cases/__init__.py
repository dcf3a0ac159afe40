"""Benchmark cases, one module per op, shared by `fastcnn bench` and the pytest-benchmark files in
bench/ (which are not installed; these modules are).

Adding an op to the benchmarks is adding one module here and one line to OPS. A module defines:

    OP            short name used on the command line and in results ("depthwise")
    TITLE         human title
    MODES         default modes, a subset of ("forward", "forward+backward", "backward")
    LAYOUTS       layouts it supports, a subset of ("nchw", "channels_last")
    ARG_NAMES     names of the positional arguments make_inputs returns (gradients are reported
                  as grad_<name> for the tensors among them)
    shapes(quick=False, batches=None) -> list of objects with .name, .label, .params (a dict)
    make_inputs(shape, generator) -> list of arguments (NCHW fp32 CPU tensors, Nones, ints...);
                  the driver converts tensors to the device, dtype and layout, and makes the
                  floating-point ones require grad in backward modes
    reference(*args) -> output: fastcnn.reference, the definition errors are measured against
    providers(device, compile=False) -> list of benchmarking.ProviderSpec; the PyTorch eager
                  baseline is named benchmarking.BASELINE ("torch")
    cost(shape, mode, element_size) -> (bytes that must move, flops) for the floor
"""
import importlib

OPS = {
    "depthwise": "fastcnn.bench_cases.depthwise",
}


def names():
    return list(OPS)


def get(name):
    if name not in OPS:
        raise ValueError(f"unknown benchmark op {name!r}; known: {', '.join(OPS)}")
    return importlib.import_module(OPS[name])
