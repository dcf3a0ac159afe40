"""Whole models built from fastcnn layers under pytest-benchmark (driver: bench/cases.py): MobileNet
v1 and the STN classifier, fastcnn's layers against the same model on stock PyTorch ops. Cases and
providers come from fastcnn.bench_cases.models, the same definitions `fastcnn bench --op models`
uses.

    pytest bench/bench_models.py --bench-quick
"""
import cases

from fastcnn.bench_cases import models as op


def pytest_generate_tests(metafunc):
    cases.parametrize(metafunc, op)


def test_models(benchmark, device, dtype, shape, layout, mode, provider):
    cases.run(benchmark, op, device, dtype, shape, layout, mode, provider)
