"""The Spatial Transformer sampler (affine grid + bilinear grid_sample) under pytest-benchmark
(driver: bench/cases.py). Cases and providers come from fastcnn.bench_cases.grid_sample, the same
definitions `fastcnn bench --op grid_sample` uses; the fastcnn[<backend>,deterministic] providers
run under torch.use_deterministic_algorithms(True).

    pytest bench/bench_grid_sample.py --bench-quick --no-compile
    pytest bench/bench_grid_sample.py -k "imagenet224 and forward+backward" --benchmark-json=out.json
"""
import cases

from fastcnn.bench_cases import grid_sample as op


def pytest_generate_tests(metafunc):
    cases.parametrize(metafunc, op)


def test_grid_sample(benchmark, device, dtype, shape, layout, mode, provider):
    cases.run(benchmark, op, device, dtype, shape, layout, mode, provider)
