"""Which kernel backends exist on this machine, and which one an op call uses.

Backends: ``cpu`` (C++ kernels for CPU tensors), ``cuda`` (C++/CUDA kernels for CUDA tensors),
``triton`` (Triton kernels; GPU tensors, or CPU tensors under TRITON_INTERPRET=1) and
``reference`` (stock PyTorch: always there). ``auto`` picks the native C++ kernel for the
tensor's device, and the reference when the extension is missing.

Selection, strongest first: ``with fastcnn.use_backend(name):``, then the FASTCNN_BACKEND
environment variable, then ``auto``. Inside a torch.func transform see `python_autograd_needed`.
"""
import contextlib
import functools
import os
import sys
import threading

import torch

from . import _extension

NAMES = ("auto", "cpu", "cuda", "triton", "reference")
_local = threading.local()
# How many use_backend() blocks are open, in any thread. requested() runs on every op call, and
# right after a C++ op a threading.local lookup costs ~3 us; at zero it is skipped.
_open_overrides = 0
_open_overrides_lock = threading.Lock()  # += on a global is not atomic across threads
# os.environ's own mapping and key, read directly: os.environ.get costs ~1.5 us a call, the dict
# lookup 50 ns. monkeypatch.setenv and os.environ[...] = ... update the same mapping.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("FASTCNN_BACKEND") if hasattr(os.environ, "encodekey") else None


@functools.lru_cache(maxsize=None)
def _triton_status():
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"triton is not installed ({exc})"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "TRITON_INTERPRET=1: kernels run on CPU tensors in the interpreter"
    if not torch.cuda.is_available():
        return False, "no GPU (set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors, slowly)"
    return True, f"triton {triton.__version__}"


@torch.compiler.assume_constant_result
def _ready(name):
    """Whether backend `name` can run here: status()[name][0] without building the reasons. op
    calls ask this, under torch.compile too: dynamo calls it once while tracing and keeps the
    answer, instead of tracing into the extension's build query and torch.cuda's device name."""
    if name == "cpu":
        return _extension.has_ops()
    if name == "cuda":
        return _extension.has_ops() and _extension.build_info().get("cuda") == "1" and torch.cuda.is_available()
    if name == "triton":
        return _triton_status()[0]
    return True


def status():
    """Every backend with (available, reason)."""
    ops_ok = _extension.has_ops()
    cuda_built = _extension.build_info().get("cuda") == "1"
    return {
        "cpu": (ops_ok, "C++ kernels loaded" if ops_ok else _extension.load_error()),
        "cuda": (
            ops_ok and cuda_built and torch.cuda.is_available(),
            "no fastcnn._C" if not ops_ok
            else "built without CUDA sources" if not cuda_built
            else "no GPU visible" if not torch.cuda.is_available()
            else f"CUDA kernels on {torch.cuda.get_device_name()}",
        ),
        "triton": _triton_status(),
        "reference": (True, "stock PyTorch"),
    }


def available():
    """Names of the backends that work here."""
    return [name for name, (ok, _) in status().items() if ok]


def _check_name(name):
    if name not in NAMES:
        raise ValueError(f"unknown fastcnn backend {name!r}; expected one of {', '.join(NAMES)}")
    return name


@contextlib.contextmanager
def use_backend(name):
    """Run the ops inside the block on backend `name` (one of NAMES)."""
    global _open_overrides
    _check_name(name)
    previous = getattr(_local, "backend", None)
    _local.backend = name
    with _open_overrides_lock:
        _open_overrides += 1
    try:
        yield
    finally:
        _local.backend = previous
        with _open_overrides_lock:
            _open_overrides -= 1


def requested():
    """The backend asked for: use_backend() > FASTCNN_BACKEND > 'auto'."""
    name = getattr(_local, "backend", None) if _open_overrides else None
    if name is None:
        if _ENV_DATA is not None and _ENV_KEY is not None:
            if not _ENV_DATA.get(_ENV_KEY):  # the common case, on every op call: keep it cheap
                return "auto"
        env = os.environ.get("FASTCNN_BACKEND")
        if not env:
            return "auto"
        name = env.strip().lower() or "auto"
    return _check_name(name)


def python_autograd_needed():
    """Whether a torch.func transform (grad, vjp, jvp, vmap, hessian, ...) is running, or a
    forward-mode AD level (torch.autograd.forward_ad.dual_level) is open. Neither can see into the
    kernels' C++ autograd functions, so then the ops take a path they can follow (the C++ kernels
    through fastcnn/ops/_*_functorch.py: Python autograd functions with backward, vmap and jvp
    rules; the Triton backend the reference). Not while torch.compile traces (the check itself
    would break the graph)."""
    if _interpreter_stack() is None:
        forward_ad = sys.modules.get("torch.autograd.forward_ad")  # not imported: no level open
        if forward_ad is None or forward_ad._current_level < 0:
            return False
    return not torch.compiler.is_compiling()


_interpreter_stack = torch._C._functorch.peek_interpreter_stack  # 60 ns a call


def resolve(device):
    """The concrete backend for tensors on `device`; raises when the requested one cannot run there."""
    name = requested()
    if name == "auto":
        if not _extension.has_ops():
            return "reference"
        if device.type == "cpu":
            return "cpu"
        if device.type == "cuda" and _ready("cuda"):
            return "cuda"
        if device.type == "cuda" and _ready("triton"):
            return "triton"
        return "reference"
    if not _ready(name):
        raise RuntimeError(f"fastcnn backend {name!r} is not available here: {status()[name][1]}")
    if name in ("cpu", "cuda") and device.type != name:
        raise RuntimeError(f"fastcnn backend {name!r} cannot run on {device.type} tensors")
    return name
