"""Tests of the Spatial Transformer Triton kernels (kernels/grid_sample.py), reference
F.grid_sample and F.affine_grid + F.grid_sample.

- On CPU: the kernels run under TRITON_INTERPRET=1 in a subprocess (the variable must be set
  before triton is imported) over tests/triton_interpreted/check_grid_sample.py (forward and every
  gradient, atomic and deterministic backwards, all modes and paddings, NaN/Inf coordinates);
  they are compiled for an H100 (sm_90) without running, which catches what the interpreter
  accepts but the compiler does not; and the launchers are traced with fake tensors, as
  triton_op and torch.compile do.
- On a GPU (`cuda` marker): the same comparisons on STN-sized problems in fp32/fp16/bf16, bitwise
  reproducibility of the deterministic backward where atomics would race, opcheck of the Triton
  ops, and a fullgraph torch.compile through fastcnn.ops with the triton backend.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from kernel_test_support import compile_sm90, needs_ptxas

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "triton_interpreted"))
import check_grid_sample as check  # noqa: E402

sys.path.pop(0)

K = check.load_kernels()
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.mark.slow
def test_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "triton_interpreted", "check_grid_sample.py")],
        cwd=check.REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"


# ----------------------------------------------------------------------------------------------
# Compilation for sm_90 without a GPU





@pytest.mark.parametrize("dtype,channels_last,blocks,modes", [
    ("fp16", True, (16, 64), dict(INTERPOLATION=0, PADDING=2, ALIGN=False, AFFINE=True)),
    ("fp32", False, (256, 4), dict(INTERPOLATION=0, PADDING=1, ALIGN=True, AFFINE=False)),
    ("bf16", False, (64, 16), dict(INTERPOLATION=1, PADDING=0, ALIGN=False, AFFINE=True)),
    ("fp64", True, (32, 32), dict(INTERPOLATION=0, PADDING=2, ALIGN=True, AFFINE=True)),
])
def test_kernels_compile_for_sm90(dtype, channels_last, blocks, modes):
    needs_ptxas()
    block_p, block_c = blocks
    acc = "*fp64" if dtype == "fp64" else "*fp32"
    pointers = {name: f"*{dtype}" for name in ("x_ptr", "coord_ptr", "y_ptr", "g_ptr", "gc_ptr")}
    pointers.update(part_ptr=acc, wt_ptr=acc, key_ptr="*i32")
    layout = dict(CHANNELS_LAST=channels_last, ACC_F64=dtype == "fp64")
    compile_sm90(K._grid_sample_fwd_kernel, pointers, dict(modes, **layout, BLOCK_P=block_p, BLOCK_C=block_c))
    bilinear = modes["INTERPOLATION"] == 0
    # Atomic backward (fp32/fp64 accumulator) with the coordinate gradient, then the
    # deterministic configuration: keys and weights, and the gather.
    compile_sm90(K._grid_sample_bwd_kernel, dict(pointers, gi_ptr=acc),
                  dict(modes, ATOMIC=True, KEYS=False, COORD_GRAD=bilinear, **layout, BLOCK_P=block_p, BLOCK_C=block_c))
    compile_sm90(K._grid_sample_bwd_kernel, dict(pointers, gi_ptr=f"*{dtype}"),
                  dict(modes, ATOMIC=False, KEYS=True, COORD_GRAD=bilinear, **layout, BLOCK_P=block_p, BLOCK_C=block_c))
    compile_sm90(K._grid_sample_gather_kernel,
                  dict(g_ptr=f"*{dtype}", off_ptr="*i64", perm_ptr="*i64", wt_ptr=acc, gi_ptr=f"*{dtype}"),
                  dict(TAPS=4 if bilinear else 1, **layout, BLOCK_Q=block_p, BLOCK_C=block_c))


def test_kernels_compile_with_size_arguments_specialised_to_one():
    """Triton releases before 3.8 turn an int argument equal to 1 into a constexpr: the kernels
    must still compile when every size is 1."""
    needs_ptxas()
    pointers = {name: "*fp32" for name in ("x_ptr", "coord_ptr", "y_ptr", "g_ptr", "gi_ptr", "gc_ptr", "part_ptr",
                                           "wt_ptr")}
    pointers["key_ptr"] = "*i64"
    ones = dict(C=1, H=1, W=1, Ho=1, Wo=1)
    layout = dict(CHANNELS_LAST=False, ACC_F64=False, BLOCK_P=1, BLOCK_C=1)
    compile_sm90(K._grid_sample_fwd_kernel, pointers,
                  dict(ones, INTERPOLATION=0, PADDING=2, ALIGN=True, AFFINE=True, **layout))
    compile_sm90(K._grid_sample_bwd_kernel, pointers,
                  dict(ones, C_PER_PROGRAM=1, INTERPOLATION=0, PADDING=2, ALIGN=False, AFFINE=True,
                       ATOMIC=True, KEYS=True, COORD_GRAD=True, **layout))
    compile_sm90(K._grid_sample_gather_kernel,
                  dict(g_ptr="*fp32", off_ptr="*i64", perm_ptr="*i64", wt_ptr="*fp32", gi_ptr="*fp32"),
                  dict(C=1, H=1, W=1, Wo=1, P=1, TAPS=4, CHANNELS_LAST=False, ACC_F64=False, BLOCK_Q=2, BLOCK_C=1))


# ----------------------------------------------------------------------------------------------
# Tracing with fake tensors: what triton_op's generated fake and torch.compile run


def _forward_backward(x, coords, affine, out_hw, deterministic, interpolation=0):
    grid, theta = (None, coords) if affine else (coords, None)
    y = K.forward(x, grid, theta, out_hw, interpolation, 2, False)
    return (y, *K.backward(y, x, grid, theta, interpolation, 2, False, [True, True], deterministic))


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_launchers_trace_with_symbolic_shapes(affine, deterministic, channels_last):
    from torch.fx.experimental.proxy_tensor import make_fx

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(2, 8, 9, 7, device="meta", memory_format=fmt)
    coords = torch.empty(2, 2, 3, device="meta") if affine else torch.empty(2, 5, 6, 2, device="meta")
    out_hw = (5, 6)
    gm = make_fx(lambda x, c: _forward_backward(x, c, affine, out_hw, deterministic),
                 tracing_mode="symbolic")(x, coords)
    launches = [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    # forward + backward; the deterministic one adds the gather after the sort.
    assert len(launches) == (3 if deterministic else 2)
    if deterministic:
        assert any("sort" in str(n.target) for n in gm.graph.nodes)
    y, gx, gc = _forward_backward(x, coords, affine, out_hw, deterministic)
    assert y.shape == (2, 8, 5, 6) and y.is_contiguous(memory_format=fmt)
    assert gx.shape == x.shape and gx.is_contiguous(memory_format=fmt)
    assert gc.shape == coords.shape and gc.is_contiguous()


def test_launchers_run_on_fake_cuda_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 8, 9, 9, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
        theta = torch.empty(2, 2, 3, device="cuda", dtype=torch.float16)
        for deterministic in (False, True):
            y, gx, gt = _forward_backward(x, theta, True, (4, 5), deterministic)
            assert y.device.type == "cuda" and y.dtype == torch.float16
            assert y.shape == (2, 8, 4, 5) and y.is_contiguous(memory_format=torch.channels_last)
            assert gx.stride() == x.stride() and gx.dtype == torch.float16
            assert gt.shape == theta.shape and gt.dtype == torch.float16


# ----------------------------------------------------------------------------------------------
# GPU


def _gpu_cases():
    cases = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        tag = str(dtype)[6:]
        for layout in ("nchw", "channels_last"):
            # STN on MNIST (28x28, one channel) and on ImageNet crops (224x224 RGB); a transformer
            # inside a network (64 channels, 56x56 -> 28x28); a dense flow field; nearest zoom-in.
            cases += [
                check.case(f"stn_mnist_28_{layout}_{tag}", n=64, c=1, h=28, w=28, ho=28, wo=28, affine=True,
                           layout=layout, dtype=dtype, repeat=True),
                check.case(f"stn_224_border_{layout}_{tag}", n=8, c=3, h=224, w=224, ho=224, wo=224, affine=True,
                           padding="border", layout=layout, dtype=dtype, grad="expand_scalar", repeat=True),
                check.case(f"features_56_to_28_reflection_{layout}_{tag}", n=8, c=64, h=56, w=56, ho=28, wo=28,
                           affine=True, padding="reflection", align=True, layout=layout, dtype=dtype, repeat=True),
                check.case(f"flow_grid_64_{layout}_{tag}", n=4, c=32, h=64, w=64, ho=64, wo=64, coords="permuted",
                           layout=layout, dtype=dtype, grad="permuted"),
                check.case(f"nearest_zoom_in_{layout}_{tag}", n=4, c=16, h=32, w=32, ho=128, wo=128, affine=True,
                           mode="nearest", layout=layout, dtype=dtype, repeat=True),
            ]
    # The interpreted shapes too.
    cases += [dict(spec, name="interpreted_" + spec["name"]) for spec in check.INTERPRETED_CASES]
    return cases


GPU_CHUNKS = 8


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("chunk", range(GPU_CHUNKS))
def test_kernels_on_gpu(chunk):
    # In chunks: every case compiles its own kernel specialisations (over 150 s for all of them
    # in one test on the H200 machine); pytest-xdist spreads the chunks over workers.
    cases = _gpu_cases()[chunk::GPU_CHUNKS]
    failures = check.run_cases(cases, device="cuda", verbose=False, gradcheck=chunk == 0)
    assert not failures, "\n".join(f"=== {name} ===\n{text}" for name, text in failures)


def _fastcnn_ops():
    """fastcnn with its Triton kernels importable as fastcnn.kernels (an editable or regular
    install provides them; a bare PYTHONPATH checkout gets the working tree's kernels/)."""
    import fastcnn

    try:
        import fastcnn.kernels.grid_sample  # noqa: F401
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "fastcnn.kernels", os.path.join(check.REPO, "kernels", "__init__.py"),
            submodule_search_locations=[os.path.join(check.REPO, "kernels")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["fastcnn.kernels"] = module
        spec.loader.exec_module(module)
        fastcnn.kernels = module
    # The module, not the function fastcnn.ops.grid_sample that shadows its name.
    return fastcnn, importlib.import_module("fastcnn.ops.grid_sample")


@pytest.mark.cuda
@needs_cuda
def test_deterministic_backward_is_bitwise_reproducible_through_ops():
    """Under torch.use_deterministic_algorithms the op's backward gives bitwise equal gradients
    on a problem where many samples share input pixels (atomics would race)."""
    fastcnn, ops = _fastcnn_ops()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(16, 32, 24, 24, device="cuda", generator=gen).to(memory_format=torch.channels_last)
    theta = (torch.eye(2, 3, device="cuda") * 0.3 + 0.05 * torch.randn(16, 2, 3, device="cuda", generator=gen))
    go = torch.randn(16, 32, 96, 96, device="cuda", generator=gen)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        results = []
        with fastcnn.use_backend("triton"):
            for _ in range(3):
                xl, tl_ = x.clone().requires_grad_(), theta.clone().requires_grad_()
                y = ops.affine_grid_sample(xl, tl_, [16, 32, 96, 96], padding_mode="border")
                results.append(torch.autograd.grad(y, (xl, tl_), go))
    finally:
        torch.use_deterministic_algorithms(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.cuda
@needs_cuda
def test_triton_ops_opcheck():
    _, ops = _fastcnn_ops()
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    inputs = [
        randn(3, 5, 9, 11),
        randn(3, 5, 9, 11).to(memory_format=torch.channels_last),
        randn(3, 7, 9, 13)[:, 1:6, :, 1:12],  # non-contiguous view
    ]
    for x in inputs:
        for requires_grad in (False, True):
            xg = x.detach().requires_grad_(requires_grad)
            theta = (torch.eye(2, 3, device="cuda") + 0.2 * randn(3, 2, 3)).requires_grad_(requires_grad)
            grid = (2.4 * torch.rand(3, 6, 4, 2, device="cuda", generator=gen) - 1.2).requires_grad_(requires_grad)
            for mode, padding in ((0, 0), (1, 2), (0, 1)):
                torch.library.opcheck(ops._affine_grid_sample_triton, (xg, theta, [6, 4], mode, padding, False))
                torch.library.opcheck(ops._grid_sample_triton, (xg, grid, mode, padding, True))
    x = inputs[1]
    go = randn(3, 5, 6, 4)
    theta = torch.eye(2, 3, device="cuda") + 0.2 * randn(3, 2, 3)
    grid = 2.4 * torch.rand(3, 6, 4, 2, device="cuda", generator=gen) - 1.2
    for mask in ([True, True], [True, False], [False, True]):
        torch.library.opcheck(ops._affine_grid_sample_triton_backward, (go, x, theta, 0, 2, False, mask))
        torch.library.opcheck(ops._grid_sample_triton_backward, (go.expand(3, 5, 6, 4), x, grid, 1, 0, True, mask))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("deterministic", [False, True])
def test_torch_compile_fullgraph_through_ops(deterministic):
    fastcnn, ops = _fastcnn_ops()
    torch._dynamo.reset()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 6, 15, 17, device="cuda", generator=gen).to(memory_format=torch.channels_last)
    theta = torch.eye(2, 3, device="cuda") + 0.2 * torch.randn(4, 2, 3, device="cuda", generator=gen)
    grid = 2.4 * torch.rand(4, 9, 11, 2, device="cuda", generator=gen) - 1.2

    def f(x, theta, grid):
        a = ops.affine_grid_sample(x, theta, [4, 6, 9, 11], padding_mode="reflection")
        b = ops.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return (a * b).sum()

    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(deterministic)
        with fastcnn.use_backend("triton"):
            leaves = [t.clone().requires_grad_() for t in (x, theta, grid)]
            eager_loss = f(*leaves)
            eager = torch.autograd.grad(eager_loss, leaves)
            leaves_c = [t.clone().requires_grad_() for t in (x, theta, grid)]
            compiled_loss = torch.compile(f, fullgraph=True)(*leaves_c)
            compiled = torch.autograd.grad(compiled_loss, leaves_c)
    finally:
        torch.use_deterministic_algorithms(previous)
    # Without determinism the backward adds through atomics, in another order on each run.
    tol = {} if deterministic else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, e in zip(compiled, eager):
        torch.testing.assert_close(a, e, **tol)
    # And the Triton path agrees with the reference.
    leaves_r = [t.clone().requires_grad_() for t in (x, theta, grid)]
    with fastcnn.use_backend("reference"):
        reference = torch.autograd.grad(f(*leaves_r), leaves_r)
    for a, r in zip(compiled, reference):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
