"""Benchmark cases, one module per op, shared by `fastcnn bench` and the pytest-benchmark files in
bench/ (which are not installed; these modules are).

Adding an op to the benchmarks is adding one module here and one line to OPS. A module defines:

    OP            short name used on the command line and in results ("depthwise")
    TITLE         human title
    MODES         default modes: "forward", "forward+backward", "backward", or
                  "forward+backward[<arg name>]" (only that argument requires grad)
    LAYOUTS       layouts it supports, a subset of ("nchw", "channels_last")
    ARG_NAMES     names of the positional arguments make_inputs returns (gradients are reported
                  as grad_<name> for the tensors among them)
    shapes(quick=False, batches=None) -> list of objects with .name, .label, .params (a dict)
    make_inputs(shape, generator) -> list of arguments (NCHW fp32 CPU tensors, Nones, ints...);
                  the driver converts tensors to the device, dtype and layout, and makes the
                  floating-point ones (or the one a [<arg name>] mode names) require grad in
                  backward modes
    reference(*args) -> output: fastcnn.reference, the definition errors are measured against
    providers(device, compile=False) -> list of benchmarking.ProviderSpec; the PyTorch eager
                  baseline is named benchmarking.BASELINE ("torch")
    cost(shape, mode, element_size) -> (bytes that must move, flops) for the floor

and optionally

    SUMMARY       a Summary: groups of cases whose ratios the report condenses into one geometric
                  mean each (a model's layers, the shapes of an issue's headline figure)
    REFERENCE_DTYPE  the dtype errors are measured in on every device (default: fp64 on GPUs,
                  fp32 on CPU; see benchmarking.reference_dtype)
"""
import dataclasses
import fnmatch
import importlib
from typing import Dict, Optional, Sequence

OPS = {
    "depthwise": "fastcnn.bench_cases.depthwise",
    "grid_sample": "fastcnn.bench_cases.grid_sample",
    "models": "fastcnn.bench_cases.models",
}


@dataclasses.dataclass(frozen=True)
class Summary:
    """How `fastcnn report` condenses an op's results: one row per group x layout x mode (x batch
    size when `by_batch`), per provider the geometric mean of its ratios over the group's cases,
    each case weighted by its params["repeat"] (default 1).

    groups    label -> case-name patterns (fnmatch globs; a plain name matches itself)
    note      the sentence above the table
    column    header of the label column
    by_batch  one row per batch size (params["N"]); otherwise the batch column lists the sizes
              that went into the mean
    """

    groups: Dict[str, Sequence[str]]
    note: str = "Geometric means over groups of cases:"
    column: str = "group"
    by_batch: bool = False

    def group_of(self, case: str) -> Optional[str]:
        """The label of the first group with a pattern matching `case`, else None."""
        for label, patterns in self.groups.items():
            if any(fnmatch.fnmatchcase(case, pattern) for pattern in patterns):
                return label
        return None

    def expected(self, label: str) -> Optional[int]:
        """How many cases the group has when its patterns are all plain names, else None."""
        patterns = self.groups[label]
        if any(ch in pattern for pattern in patterns for ch in "*?["):
            return None
        return len(set(patterns))


def names():
    return list(OPS)


def get(name):
    if name not in OPS:
        raise ValueError(f"unknown benchmark op {name!r}; known: {', '.join(OPS)}")
    return importlib.import_module(OPS[name])


def summary(name) -> Optional[Summary]:
    """The Summary op `name` declares; None for an op without one or unknown here."""
    try:
        module = get(name)
    except (ValueError, ImportError):
        return None
    return getattr(module, "SUMMARY", None)
