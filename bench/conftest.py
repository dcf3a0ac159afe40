"""pytest-benchmark configuration for bench/. Collected only when asked for (`pytest bench/`):
the project's pytest settings point testpaths at tests/, so a plain `pytest` never runs these.

Options:
    --bench-device cpu|cuda   default: cuda when a GPU is visible, else cpu
    --bench-dtype float32|float16|bfloat16|float64
    --bench-quick             the `fastcnn bench --quick` subset of each op (depthwise: batch 1, no
                              31x31; grid_sample: the first three shapes)
    --compile / --no-compile  race torch.compile too (default on; FASTCNN_BENCH_COMPILE=0 turns it
                              off; a first compile on a 2-core CPU takes about 20 s per case)

The environment record of fastcnn.benchmarking (versions, CPU/GPU, threads, allocator) is saved in
pytest-benchmark's machine_info, so `--benchmark-json` / `--benchmark-autosave` files carry it.
The timing rules of pytest-benchmark apply here (calibrated rounds, one test at a time); the
interleaved-rounds ratios of the design notes come from `fastcnn bench`.
"""
import os

import pytest
import torch


def pytest_addoption(parser):
    group = parser.getgroup("fastcnn-bench", "fastcnn benchmarks")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when available)")
    group.addoption("--bench-dtype", default="float32", choices=("float32", "float16", "bfloat16", "float64"))
    group.addoption("--bench-quick", action="store_true", help="the quick subset of cases")
    default = os.environ.get("FASTCNN_BENCH_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")
    group.addoption("--compile", dest="bench_compile", action="store_true", default=default,
                    help="also benchmark torch.compile (default on; FASTCNN_BENCH_COMPILE=0 changes the default)")
    group.addoption("--no-compile", dest="bench_compile", action="store_false", help="leave torch.compile out")


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py as test modules when the directory is run (`pytest bench/`); a file named
    on the command line is collected by pytest itself."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def device(pytestconfig):
    name = pytestconfig.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@pytest.fixture(scope="session")
def dtype(pytestconfig):
    return getattr(torch, pytestconfig.getoption("--bench-dtype"))


def pytest_benchmark_update_machine_info(config, machine_info):
    from fastcnn import benchmarking

    machine_info["fastcnn"] = benchmarking.environment()
