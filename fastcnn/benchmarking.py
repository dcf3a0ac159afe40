"""Timing machinery shared by the `fastcnn bench` command and the pytest-benchmark files in bench/.

The rules it implements (see the project's design notes):

* Interleaved rounds. Every round runs every provider once, in alternating order (A B C, C B A,
  A B C, ...), so slow drifts of a shared machine hit all providers alike. A provider's time is
  the median over rounds; its speed against the baseline is the median of the per-round ratios
  ``t_baseline / t_provider`` (> 1 means faster than the baseline), not the ratio of medians.
* Synchronisation. On CUDA a measurement is bracketed by CUDA events after a
  ``torch.cuda.synchronize()``; on CPU by ``time.perf_counter``.
* Calibration. A measurement repeats a call until it lasts at least ``min_time`` seconds; the
  number of rounds shrinks (never below ``min_rounds``) when the whole would exceed ``max_time``.
* Floors. The time a call cannot beat: bytes it must move over the copy bandwidth, or flops over
  the measured matmul rate, whichever is larger. The bandwidth is measured in the same interleaved
  rounds as the case (a 64 MiB ``copy_`` into an existing buffer, 1 GiB on a GPU, timed each round
  beside the providers), and ``floor_fraction`` is the median over rounds of floor / time (1.0 = at
  the roofline; above 1 means the data stayed in cache, since the bandwidth is measured from DRAM).
  A bandwidth measured once per process moved 2x between runs on a shared machine (31-85 GB/s on
  one Zen 5 VM within an hour) and took every floor fraction with it; measured beside the kernel it
  sees the same neighbours. The process-wide figure (``floors``) stays in the record.
* Environment. torch/Triton/CUDA versions, CPU model, thread count, GPU, and the glibc allocator
  setting (``mmap_max=0`` in GLIBC_TUNABLES: freed memory is reused instead of returned to the
  kernel, so large temporaries stop paying first-touch page faults) go with every result.

The op-independent driver :func:`run_op` takes an op module from ``fastcnn.bench_cases`` and returns
one result row (a plain dict, JSON-ready) per shape x layout x mode x provider.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import math
import os
import platform
import statistics
import subprocess
import time
from typing import Any, Callable, ContextManager, Dict, Iterable, List, Optional, Sequence

import torch

SCHEMA = "fastcnn-bench/1"
BASELINE = "torch"
REUSE_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
BACKWARD_MODES = ("forward+backward", "backward")


def split_mode(mode: str):
    """(base mode, argument) of a mode: "forward+backward[theta]" is a forward+backward in which
    only `theta` needs a gradient (an STN's input is data, so PyTorch and fastcnn both skip
    grad_input); a plain mode gives (mode, None)."""
    if mode.endswith("]") and "[" in mode:
        base, arg = mode[:-1].split("[", 1)
        return base, arg
    return mode, None


def is_backward(mode: str) -> bool:
    return split_mode(mode)[0] in BACKWARD_MODES


# ------------------------------------------------------------------------------------------------
# Clocks


class WallClock:
    """Times `n` calls with a wall-clock timer; `sync` (e.g. torch.cuda.synchronize) runs before
    the clock is read at either end. `timer` is injectable for tests."""

    def __init__(self, timer: Callable[[], float] = time.perf_counter, sync: Optional[Callable[[], None]] = None):
        self.timer = timer
        self.sync = sync

    def measure(self, fn: Callable[[], Any], n: int) -> float:
        if self.sync is not None:
            self.sync()
        start = self.timer()
        for _ in range(n):
            fn()
        if self.sync is not None:
            self.sync()
        return self.timer() - start


class CudaEventClock:
    """Times `n` calls between two CUDA events on the current stream (after a device-wide sync,
    so earlier work is not billed to this measurement)."""

    def measure(self, fn: Callable[[], Any], n: int) -> float:
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def clock_for(device) -> Any:
    device = torch.device(device)
    return CudaEventClock() if device.type == "cuda" else WallClock()


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------
# Interleaved timing


@dataclasses.dataclass
class Provider:
    """One contender. `fn` is one complete call (already bound to its inputs). `context`, when
    given, is entered around every measurement, outside the timed region (e.g. a backend
    selection), so its cost is not billed to the calls."""

    name: str
    fn: Callable[[], Any]
    context: Optional[Callable[[], ContextManager]] = None


@dataclasses.dataclass
class ProviderSpec:
    """What an op's cases module offers: `fn(*args)` computes the op's output from the case's
    arguments; `context` is entered around every measurement, outside the timed region."""

    name: str
    fn: Callable[..., Any]
    context: Optional[Callable[[], ContextManager]] = None
    modes: Optional[Sequence[str]] = None  # the modes it is raced in; None: every mode
    layouts: Optional[Sequence[str]] = None  # the layouts it is raced in; None: every layout

    def runs(self, mode: str, layout: Optional[str] = None) -> bool:
        return (self.modes is None or mode in self.modes) and (
            layout is None or self.layouts is None or layout in self.layouts)


def fastcnn_backends(device) -> List[str]:
    """The fastcnn backends (other than 'reference') that can run on `device` here. Triton on CPU
    (TRITON_INTERPRET=1) is left out: the interpreter's timings mean nothing."""
    from fastcnn import backends

    device = torch.device(device)
    usable = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}.get(device.type, ())
    return [name for name in backends.available() if name in usable]


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True, fill_uninitialized_memory: bool = False):
    """`torch.use_deterministic_algorithms(enabled)` inside the block, the previous setting (and
    its warn_only) restored after. With deterministic algorithms on, PyTorch by default also fills
    every torch.empty with NaN (torch.utils.deterministic.fill_uninitialized_memory), a debugging
    aid that adds a full write of every fresh output; it is off inside the block unless asked for,
    so a deterministic provider is billed for its algorithm, not for that fill."""
    import torch.utils.deterministic as deterministic

    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_fill = deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(enabled)
    deterministic.fill_uninitialized_memory = fill_uninitialized_memory
    try:
        yield
    finally:
        deterministic.fill_uninitialized_memory = previous_fill
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn_only)


@contextlib.contextmanager
def environment_variables(env: Optional[Dict[str, str]]):
    """`env` set in os.environ inside the block (kernel variants that the C++ launchers read per
    call), the previous values restored after."""
    saved = {name: os.environ.get(name) for name in env or {}}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def fastcnn_context(
    backend: str, deterministic: bool = False, env: Optional[Dict[str, str]] = None
) -> Callable[[], ContextManager]:
    """A context factory for a ProviderSpec: fastcnn.use_backend(backend), with `deterministic`
    also torch.use_deterministic_algorithms(True) (see deterministic_algorithms), and `env` set in
    the environment (see environment_variables)."""

    @contextlib.contextmanager
    def context():
        import fastcnn

        with environment_variables(env), fastcnn.use_backend(backend):
            if deterministic:
                with deterministic_algorithms(True):
                    yield
            else:
                yield

    return context


@dataclasses.dataclass
class Timing:
    name: str
    times: List[float]  # seconds per call, one entry per round
    inner: int = 1  # calls per measurement
    ratios: Optional[List[float]] = None  # t_baseline / t_self, one per round
    error: Optional[str] = None

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.times) if self.times else None

    @property
    def ratio(self) -> Optional[float]:
        return statistics.median(self.ratios) if self.ratios else None

    @property
    def spread(self) -> Optional[float]:
        """Interquartile range of the per-round ratios relative to their median (noise gauge)."""
        if not self.ratios or len(self.ratios) < 4:
            return None
        q = statistics.quantiles(self.ratios, n=4)
        return (q[2] - q[0]) / statistics.median(self.ratios)


def round_order(n: int, round_index: int) -> List[int]:
    """Provider order in a round: forward in even rounds, reversed in odd ones (A B, B A, A B...)."""
    order = list(range(n))
    return order if round_index % 2 == 0 else order[::-1]


def summarize(times: Dict[str, List[float]], baseline: Optional[str] = BASELINE) -> Dict[str, Timing]:
    """Per-provider Timing from per-round times; ratios are per round, against `baseline`."""
    out = {name: Timing(name, list(ts)) for name, ts in times.items()}
    if baseline in times:
        base = times[baseline]
        for name, timing in out.items():
            if len(timing.times) == len(base) and base:
                timing.ratios = [b / t if t > 0 else math.inf for b, t in zip(base, timing.times)]
    return out


def _entered(provider: Provider):
    return provider.context() if provider.context is not None else contextlib.nullcontext()


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _repeats(min_time: float, t: float, max_inner: int) -> int:
    """Calls per measurement so that one measurement lasts at least min_time."""
    if t >= min_time:
        return 1
    return max(1, min(max_inner, math.ceil(min_time / max(t, 1e-9) - 1e-9)))


def time_interleaved(
    providers: Sequence[Provider],
    *,
    baseline: Optional[str] = BASELINE,
    rounds: int = 10,
    min_rounds: int = 3,
    warmup: int = 1,
    min_time: float = 0.01,
    max_time: Optional[float] = None,
    max_inner: int = 100_000,
    clock=None,
) -> Dict[str, Timing]:
    """Times `providers` in interleaved rounds. Returns name -> Timing (with `error` set for a
    provider that raised; it is dropped from the remaining rounds)."""
    clock = clock if clock is not None else WallClock()
    failed: Dict[str, Timing] = {}
    live: List[Provider] = []
    inner: Dict[str, int] = {}
    estimate: Dict[str, float] = {}
    for p in providers:
        try:
            with _entered(p):
                for _ in range(warmup):
                    p.fn()
                t = clock.measure(p.fn, 1)
                n = _repeats(min_time, t, max_inner)
                if n > 1:  # refine: one call is too short to time reliably
                    t = clock.measure(p.fn, n) / n
                    n = _repeats(min_time, t, max_inner)
        except Exception as exc:  # noqa: BLE001 - a failing provider is a result, not a crash
            failed[p.name] = Timing(p.name, [], error=_describe(exc))
            continue
        live.append(p)
        inner[p.name] = n
        estimate[p.name] = t * n
    if max_time is not None and live:
        per_round = sum(estimate.values())
        rounds = max(min(min_rounds, rounds), min(rounds, int(max_time // max(per_round, 1e-12))))
    times: Dict[str, List[float]] = {p.name: [] for p in live}
    for r in range(rounds):
        for i in round_order(len(live), r):
            p = live[i]
            if p.name in failed:
                continue
            try:
                with _entered(p):
                    times[p.name].append(clock.measure(p.fn, inner[p.name]) / inner[p.name])
            except Exception as exc:  # noqa: BLE001
                failed[p.name] = Timing(p.name, [], error=_describe(exc))
    result = summarize({n: ts for n, ts in times.items() if n not in failed}, baseline)
    for name, timing in result.items():
        timing.inner = inner[name]
    result.update(failed)
    return {p.name: result[p.name] for p in providers}


# ------------------------------------------------------------------------------------------------
# Floors


COPY_PROBE = "copy (floor)"  # the timed copy of each case's rounds; not a result row


def copy_probe(device, nbytes: Optional[int] = None):
    """(a `dst.copy_(src)` of `nbytes` into an existing, touched buffer (64 MiB on CPU, 1 GiB on a
    GPU by default), the bytes it reads and writes a call: 2 x nbytes)."""
    dev = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if dev.type == "cuda" else (64 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)  # touched: no first-touch faults in the timed copies
    return Provider(COPY_PROBE, lambda: dst.copy_(src)), 2 * src.numel() * src.element_size()


@functools.lru_cache(maxsize=None)
def copy_bandwidth(device: str = "cpu", nbytes: Optional[int] = None, reps: int = 5) -> float:
    """Bytes per second of the copy probe (read and write counted), best of `reps`."""
    probe, moved = copy_probe(device, nbytes)
    clock = clock_for(device)
    probe.fn()
    return moved / min(clock.measure(probe.fn, 1) for _ in range(reps))


@functools.lru_cache(maxsize=None)
def matmul_rate(device: str = "cpu", dtype: torch.dtype = torch.float32, reps: int = 3) -> float:
    """Flops per second of a square matmul in `dtype` (2 n^3 flops); best of `reps`."""
    dev = torch.device(device)
    if dev.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        n = 512  # reduced-precision CPU matmuls can be slow: keep the probe short
    else:
        n = 4096 if dev.type == "cuda" else 1024
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    c = torch.empty(n, n, device=dev, dtype=dtype)
    clock = clock_for(dev)
    torch.matmul(a, b, out=c)
    best = min(clock.measure(lambda: torch.matmul(a, b, out=c), 1) for _ in range(reps))
    return 2 * n**3 / best


def round_floor_fractions(nbytes: float, flops: float, copy_bytes: float, copy_times: Sequence[float],
                          times: Sequence[float], device, dtype=torch.float32) -> Optional[float]:
    """Median over rounds of the floor at that round's copy bandwidth (copy_bytes / its copy time)
    over that round's time."""
    if not times or len(times) != len(copy_times):
        return None
    return statistics.median(floor_seconds(nbytes, flops, device, dtype, copy_bytes / c) / t
                             for c, t in zip(copy_times, times) if t > 0 and c > 0)


def floors(device, dtype=torch.float32) -> Dict[str, float]:
    device = str(torch.device(device))
    return {
        "copy_bandwidth_GBps": copy_bandwidth(device) / 1e9,
        "matmul_GFLOPs": matmul_rate(device, dtype) / 1e9,
        "matmul_dtype": str(dtype).replace("torch.", ""),
    }


def floor_seconds(nbytes: float, flops: float, device, dtype=torch.float32,
                  bandwidth: Optional[float] = None) -> float:
    """The lower bound on a call's time: max(bytes / copy bandwidth, flops / matmul rate); the
    bandwidth measured beside the call when given, else the process's (copy_bandwidth)."""
    device = str(torch.device(device))
    return max(nbytes / (bandwidth or copy_bandwidth(device)), flops / matmul_rate(device, dtype))


# ------------------------------------------------------------------------------------------------
# Environment


def _cpuinfo() -> Dict[str, Any]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "flags": flags}


def cpu_isa() -> Dict[str, Any]:
    """The vector ISA extensions that matter for the CPU kernels, and what ATen dispatches to."""
    flags = _cpuinfo()["flags"]
    isa = {name: name in flags for name in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile")}
    try:
        isa["aten_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch
        isa["aten_capability"] = None
    # Intel's microcode mitigation of Gather Data Sampling makes AVX-512 gathers several times
    # slower; the grid_sample kernels choose their grad_input path by it (pull_policy).
    try:
        with open("/sys/devices/system/cpu/vulnerabilities/gather_data_sampling") as f:
            isa["gather_data_sampling"] = f.read().strip()
    except OSError:
        isa["gather_data_sampling"] = None
    return isa


def allocator() -> Dict[str, Any]:
    """The glibc malloc setting: 'reuse' when GLIBC_TUNABLES holds mmap_max=0, else 'default'."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    reuse = "mmap_max=0" in tunables
    return {"name": "reuse" if reuse else "default", "mmap_max_0": reuse, "GLIBC_TUNABLES": tunables,
            "transparent_hugepage": _transparent_hugepage()}


def _transparent_hugepage() -> Optional[str]:
    """The kernel's THP mode ('always', 'madvise' or 'never'): fastcnn's CPU outputs of 2 MiB and
    more ask for huge pages, which the kernel grants under 'always' and 'madvise'."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def _git_revision() -> Optional[str]:
    # A copied tree without .git (a device machine) gets its revision from the caller.
    if os.environ.get("FASTCNN_GIT_REVISION"):
        return os.environ["FASTCNN_GIT_REVISION"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        )
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - missing or broken: record it as absent
        return None


def gpu() -> Optional[Dict[str, Any]]:
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_GiB": round(props.total_memory / 2**30, 1),
        "count": torch.cuda.device_count(),
    }


def environment() -> Dict[str, Any]:
    """What every result is recorded with."""
    import fastcnn
    from fastcnn import _extension, backends

    cpu = _cpuinfo()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fastcnn": getattr(fastcnn, "__version__", None),
        "git": _git_revision(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": cudnn,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "build_info": _extension.build_info(),
        "backends": {name: {"available": ok, "reason": why} for name, (ok, why) in backends.status().items()},
        "cpu": cpu["model"],
        "cpu_count": os.cpu_count(),
        "isa": cpu_isa(),
        "threads": torch.get_num_threads(),
        "gpu": gpu(),
        "allocator": allocator(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        # Every FASTCNN_* setting (backend, allocator, kernel variants) and the runtime's own.
        "env": {k: v for k, v in sorted(os.environ.items())
                if k.startswith("FASTCNN_") or k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTORCH_CUDA_ALLOC_CONF",
                                                     "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")},
    }


# ------------------------------------------------------------------------------------------------
# Memory figures


def saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes autograd saves for backward during `fn()`, counting each storage once."""
    seen: Dict[Any, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            try:
                storage = t.untyped_storage()
                seen[(t.device, storage.data_ptr())] = storage.nbytes()
            except Exception:  # noqa: BLE001 - e.g. tensor subclasses without storage
                pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


# ------------------------------------------------------------------------------------------------
# The op-independent driver


def to_layout(t, layout: str):
    """A 4-D tensor in `layout` ('nchw' or 'channels_last') by its strides; other ranks unchanged.
    `.to(memory_format=)`, not `.contiguous(memory_format=)`: with one channel a tensor is
    contiguous in both layouts, and `contiguous` would keep its NCHW strides, so that a
    "channels_last" case of one channel ran the NCHW paths of every provider."""
    if isinstance(t, torch.Tensor) and t.dim() == 4:
        return t.to(memory_format=LAYOUTS[layout])
    return t


def _max_abs_error(got, want) -> float:
    if got is None or want is None:
        return 0.0 if got is None and want is None else math.inf
    if got.shape != want.shape:
        return math.inf
    if got.numel() == 0:
        return 0.0
    return float((got.detach().to(want.dtype) - want).abs().max())


def reference_dtype(device, dtype, op=None) -> torch.dtype:
    """The op module's REFERENCE_DTYPE when it declares one; else fp64 on GPUs, and fp32 on CPU,
    where fp64 convolutions are orders of magnitude slower (seconds per layer; PyTorch eager then
    matches the reference exactly in fp32)."""
    if getattr(op, "REFERENCE_DTYPE", None) is not None:
        return op.REFERENCE_DTYPE
    if torch.device(device).type == "cuda":
        return torch.float64
    return torch.float32


def case_inputs(op, shape, seed: int = 0):
    """(args, grad_output): the case's arguments (NCHW, fp32, CPU) and a seeded random gradient
    for the output, the same values whatever the layout, device and dtype they are later given."""
    generator = torch.Generator().manual_seed(seed)
    args = op.make_inputs(shape, generator)
    with torch.no_grad():  # the output's shape from the meta device: free
        out_shape = op.reference(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]).shape
    return args, torch.randn(out_shape, generator=generator)


@dataclasses.dataclass
class Prepared:
    """A case's arguments on the device, in the dtype and layout of one measurement."""

    args: list
    grad_args: list  # the tensors among args that require grad (backward modes)
    grad_output: Optional[torch.Tensor]


def prepare(args, grad_output, mode: str, layout: str, device, dtype, arg_names=None) -> Prepared:
    """arg_names (the op's ARG_NAMES) is needed by modes that name the argument to differentiate."""
    needs_grad = is_backward(mode)
    only = split_mode(mode)[1]
    if only is not None and (arg_names is None or only not in arg_names):
        raise ValueError(f"mode {mode!r}: {only!r} is not among the op's arguments {arg_names}")
    prepared = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            a = a.to(device=device, dtype=dtype if a.is_floating_point() else a.dtype)
            a = to_layout(a, layout).detach()
            if needs_grad and a.is_floating_point() and (only is None or arg_names[i] == only):
                a.requires_grad_(True)
        prepared.append(a)
    grad_args = [a for a in prepared if isinstance(a, torch.Tensor) and a.requires_grad]
    g = to_layout(grad_output.to(device=device, dtype=dtype), layout) if needs_grad else None
    return Prepared(prepared, grad_args, g)


def make_call(fn, prep: Prepared, mode: str) -> Callable[[], Any]:
    """The closure a provider is timed with. forward: `fn(*args)` on inputs that need no grad.
    forward+backward: `fn(*args).backward(grad)` with a preallocated random grad; the inputs'
    .grad are reset to None first, so no call pays for accumulating into the previous one's.
    backward: the backward alone, of one retained graph."""
    args, grad_args, g = prep.args, prep.grad_args, prep.grad_output
    mode = split_mode(mode)[0]
    if mode == "forward":
        return lambda: fn(*args)
    if mode == "forward+backward":

        def run():
            for a in grad_args:
                a.grad = None
            out = fn(*args)
            out.backward(g)
            return out

        return run
    if mode == "backward":
        holder = {}

        def run():
            for a in grad_args:
                a.grad = None
            if "out" not in holder:
                holder["out"] = fn(*args)
            holder["out"].backward(g, retain_graph=True)
            return holder["out"]

        return run
    raise ValueError(f"unknown mode {mode!r}; expected forward, forward+backward or backward")


def reference_outputs(
    op, args, grad_output, *, with_grad: bool, device, dtype, input_dtype: Optional[torch.dtype] = None
) -> Dict[str, torch.Tensor]:
    """The reference's output (and, `with_grad`, the gradients of its floating-point arguments
    for `grad_output`), computed in `dtype` on NCHW inputs. `input_dtype` (the measured dtype)
    rounds the inputs and grad_output to it first: an fp16 run's error then measures the kernels,
    not the rounding of their inputs (fp16 theta moves a 224-pixel sample by ~0.1 pixel)."""

    def rounded(t):
        return t.to(input_dtype) if input_dtype is not None and t.is_floating_point() else t

    ref_args = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = rounded(a).to(device=device, dtype=dtype).detach().requires_grad_(with_grad)
        elif isinstance(a, torch.Tensor):
            a = a.to(device)
        ref_args.append(a)
    if not with_grad:
        with torch.no_grad():
            return {"output": op.reference(*ref_args)}
    out = op.reference(*ref_args)
    out.backward(rounded(grad_output).to(device=device, dtype=dtype))
    result = {"output": out.detach()}
    for name, a in zip(op.ARG_NAMES, ref_args):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            result[f"grad_{name}"] = a.grad
    return result


def errors(op, out, prep: Prepared, ref: Dict[str, torch.Tensor], mode: str) -> Dict[str, float]:
    """Max abs error of the output (and, in backward modes, of every input gradient) against `ref`."""
    result = {"output": _max_abs_error(out, ref["output"])}
    if is_backward(mode):
        for name, a in zip(op.ARG_NAMES, prep.args):
            if isinstance(a, torch.Tensor) and a.requires_grad:
                result[f"grad_{name}"] = _max_abs_error(a.grad, ref.get(f"grad_{name}"))
    return result


def relative_error(errs: Dict[str, float], ref: Dict[str, torch.Tensor]) -> float:
    """max over outputs of max|error| / max|reference|: comparable across shapes and reductions."""
    worst = 0.0
    for key, err in errs.items():
        scale = float(ref[key].abs().max()) if key in ref and ref[key].numel() else 0.0
        worst = max(worst, err / scale if scale > 0 else (0.0 if err == 0 else math.inf))
    return worst


def _check_call(op, fn, prep, ref, mode, device, context) -> Dict[str, Any]:
    """One untimed call (also the first warm-up): errors, bytes saved for backward, GPU peak."""
    info: Dict[str, Any] = {}
    try:
        with (context() if context else contextlib.nullcontext()):
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            if split_mode(mode)[0] == "forward+backward":
                holder = {}
                info["saved_bytes"] = saved_bytes(lambda: holder.setdefault("out", fn()))
                out = holder.pop("out")
            else:
                out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
                info["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - before
            if ref is not None:
                info["errors"] = errors(op, out, prep, ref, mode)
                info["rel_error"] = relative_error(info["errors"], ref)
    except Exception as exc:  # noqa: BLE001 - a failing provider is a result, not a crash
        if device.type == "cuda" and _context_lost(exc):
            raise  # every later call fails too, and the fault may be an earlier call's
        info["error"] = _describe(exc)
    return info


# CUDA errors that leave the context unusable (cudaGetLastError cannot clear them).
_STICKY_CUDA_ERRORS = ("illegal memory access", "misaligned address", "device-side assert", "illegal instruction",
                       "unspecified launch failure")


def _context_lost(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(marker in text for marker in _STICKY_CUDA_ERRORS)


def run_op(
    op,
    *,
    device="cpu",
    dtype=torch.float32,
    shapes: Optional[Sequence[Any]] = None,
    layouts: Sequence[str] = ("nchw", "channels_last"),
    modes: Optional[Sequence[str]] = None,
    providers: Optional[Sequence[str]] = None,
    compile: bool = False,
    rounds: int = 10,
    min_rounds: int = 3,
    min_time: float = 0.01,
    max_time: Optional[float] = 30.0,
    check: bool = True,
    seed: int = 0,
    progress: Optional[Callable[[str], None]] = None,
) -> List[Dict[str, Any]]:
    """Benchmarks one op module (see fastcnn.bench_cases) and returns one row per shape x layout x
    mode x provider. `providers` filters provider names (None: all the op offers here)."""
    device = torch.device(device)
    shapes = list(op.shapes() if shapes is None else shapes)
    modes = list(op.MODES if modes is None else modes)
    ref_dtype = reference_dtype(device, dtype, op)
    element_size = torch.empty((), dtype=dtype).element_size()
    rows: List[Dict[str, Any]] = []
    probe, probe_bytes = None, 0  # the copy probe, made for the first timed case
    for shape in shapes:
        args, grad_output = case_inputs(op, shape, seed)
        # One reference per shape, on NCHW inputs, for every layout and mode.
        ref = None
        if check:
            with_grad = any(is_backward(m) for m in modes)
            ref = reference_outputs(
                op, args, grad_output, with_grad=with_grad, device=device, dtype=ref_dtype, input_dtype=dtype
            )
        for layout in layouts:
            for mode in modes:
                if progress is not None:
                    progress(f"{op.OP} {shape.name} {shape.label} {layout} {mode}")
                prep = prepare(args, grad_output, mode, layout, device, dtype, op.ARG_NAMES)
                offered = [
                    p for p in op.providers(device, compile=compile)
                    if (providers is None or p.name in providers) and p.runs(mode, layout)
                ]
                timed: List[Provider] = []
                checks: Dict[str, Dict[str, Any]] = {}
                for spec in offered:
                    fn = make_call(spec.fn, prep, mode)
                    checks[spec.name] = _check_call(op, fn, prep, ref, mode, device, spec.context)
                    if "error" not in checks[spec.name]:
                        timed.append(Provider(spec.name, fn, spec.context))
                if timed:
                    if probe is None:
                        probe, probe_bytes = copy_probe(device)
                    timed.append(probe)
                timings = time_interleaved(
                    timed, rounds=rounds, min_rounds=min_rounds, warmup=0, min_time=min_time, max_time=max_time,
                    clock=clock_for(device),
                )
                copy_timing = timings.pop(COPY_PROBE, None)
                copy_times = copy_timing.times if copy_timing is not None and copy_timing.error is None else []
                nbytes, flops = op.cost(shape, mode, element_size)
                copy_bandwidth_now = probe_bytes / statistics.median(copy_times) if copy_times else None
                floor = floor_seconds(nbytes, flops, device, dtype, copy_bandwidth_now)
                for spec in offered:
                    t, info = timings.get(spec.name), checks[spec.name]
                    median = t.median if t is not None else None
                    errs = info.get("errors")
                    rows.append({
                        "op": op.OP,
                        "case": shape.name,
                        "shape": shape.label,
                        "params": dict(shape.params),
                        "layout": layout,
                        "mode": mode,
                        "provider": spec.name,
                        "device": str(device),
                        "dtype": str(dtype).replace("torch.", ""),
                        "time_ms": median * 1e3 if median is not None else None,
                        "times_ms": [x * 1e3 for x in t.times] if t is not None else [],
                        "inner": t.inner if t is not None else None,
                        "rounds": len(t.times) if t is not None else 0,
                        "ratio": t.ratio if t is not None else None,
                        "ratio_spread": t.spread if t is not None else None,
                        "max_abs_error": max(errs.values()) if errs else None,
                        "max_rel_error": info.get("rel_error"),
                        "errors": errs,
                        "bytes": nbytes,
                        "flops": flops,
                        "floor_ms": floor * 1e3,
                        "floor_fraction": (
                            round_floor_fractions(nbytes, flops, probe_bytes, copy_times, t.times, device, dtype)
                            if copy_times and t is not None and not t.error else (floor / median if median else None)),
                        "copy_bandwidth_GBps": copy_bandwidth_now / 1e9 if copy_bandwidth_now else None,
                        "saved_bytes": info.get("saved_bytes"),
                        "peak_mem_bytes": info.get("peak_mem_bytes"),
                        "error": info.get("error") or (t.error if t is not None else None),
                    })
                del prep, timed, timings
    return rows


def run_record(rows: List[Dict[str, Any]], *, device, dtype, settings: Dict[str, Any]) -> Dict[str, Any]:
    """The JSON document for one process's results: rows tagged with this process's allocator."""
    env = environment()
    for row in rows:
        row["allocator"] = env["allocator"]["name"]
    return {
        "schema": SCHEMA,
        "settings": settings,
        "runs": [{"allocator": env["allocator"]["name"], "environment": env, "floors": floors(device, dtype)}],
        "results": rows,
    }


def merge_records(records: Iterable[Dict[str, Any]]) -> Dict[str, Any]:
    """One document from several (e.g. one per allocator setting)."""
    records = list(records)
    merged = {"schema": SCHEMA, "settings": records[0]["settings"] if records else {}, "runs": [], "results": []}
    for rec in records:
        merged["runs"].extend(rec["runs"])
        merged["results"].extend(rec["results"])
    return merged
