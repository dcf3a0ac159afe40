"""Depthwise conv2d under pytest-benchmark (driver: bench/cases.py). Cases and providers come from
fastcnn.bench_cases.depthwise, the same definitions `fastcnn bench --op depthwise` uses.

    pytest bench/bench_depthwise.py --bench-quick --no-compile
    pytest bench/ -k "mbv1-dw3 and channels_last" --benchmark-json=out.json
"""
import cases

from fastcnn.bench_cases import depthwise as op


def pytest_generate_tests(metafunc):
    cases.parametrize(metafunc, op)


def test_depthwise(benchmark, device, dtype, shape, layout, mode, provider):
    cases.run(benchmark, op, device, dtype, shape, layout, mode, provider)
