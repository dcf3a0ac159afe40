"""What every Triton launcher in this package does around its kernel launches.

- A Triton kernel launches on the *current* CUDA device and stream, not on its tensors' device
  (triton-lang/triton#2441; linkedin/Liger-Kernel#1303). A layer whose tensors live on cuda:1
  while cuda:0 is current (``device_map="auto"``, several models in one process) would run on the
  wrong GPU, or fail with "Pointer argument cannot be accessed from Triton". `on_tensor_device`
  makes the tensors' device current for the launcher, as ``c10::cuda::CUDAGuard`` does for the C++
  kernels.
- A CUDA grid has at most 2**31 - 1 blocks along x and 65535 along y and z. `grid` checks the
  launch, so that a shape too large for a kernel's grid fails with a message naming the shape
  instead of a CUDA launch error.
- Host time: a small convolution's kernel takes microseconds on a GPU, so the launchers' own
  Python counts. `cdiv` and `memory_format` replace `triton.cdiv` (~2.5 us a call through Triton's
  constexpr wrapper) and a bare `torch._prims_common.suggest_memory_format` (~14 us).
"""
import functools

import torch
import torch._prims_common
from torch._subclasses.fake_tensor import is_fake

MAX_GRID = (2**31 - 1, 65535, 65535)


def _real_cuda_tensor(args):
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.device.type == "cuda":
            # Fake and functional tensors (torch.compile, triton_op tracing, opcheck) launch
            # nothing; asking for their device's context would initialise CUDA where there is none.
            return None if is_fake(arg) else arg
    return None


def on_tensor_device(launcher):
    """Runs `launcher` with its first CUDA tensor argument's device current."""

    @functools.wraps(launcher)
    def launch_on_tensor_device(*args, **kwargs):
        tensor = _real_cuda_tensor(args)
        if tensor is None or tensor.device.index == torch.cuda.current_device():
            return launcher(*args, **kwargs)
        with torch.cuda.device(tensor.device):
            return launcher(*args, **kwargs)

    return launch_on_tensor_device


def cdiv(a, b):
    """ceil(a / b), for ints and SymInts."""
    return (a + b - 1) // b


def memory_format(t):
    """The memory format a launcher's outputs take from `t`: Tensor.suggest_memory_format's
    Python twin, torch._prims_common.suggest_memory_format (the rule PyTorch's meta functions
    use, safe on symbolic strides; the ops' fake impls use it too). Plain tensors' answers are
    kept by (shape, strides), so eager calls skip its symbolic-shape machinery."""
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter:
        return _memory_format_of_strides(t.shape, t.stride())
    return torch._prims_common.suggest_memory_format(t)


@functools.lru_cache(maxsize=4096)
def _memory_format_of_strides(shape, strides):
    return torch._prims_common.suggest_memory_format(torch.empty_strided(shape, strides, device="meta"))


def grid(*blocks, op, axis_meaning):
    """`blocks` (the launch grid) when CUDA can launch it, else a ValueError naming `op` and what
    each grid axis counts (`axis_meaning[i]`). Symbolic sizes (traced with dynamic shapes) are
    passed through unchecked: a comparison would specialise the graph on them."""
    for axis, (count, limit) in enumerate(zip(blocks, MAX_GRID)):
        if isinstance(count, int) and count > limit:
            raise ValueError(
                f"{op} (Triton): this shape needs {count} program blocks along CUDA grid axis {axis} "
                f"({axis_meaning[axis]}), more than the {limit} a launch allows; "
                "use the 'cuda' backend (fastcnn.use_backend('cuda')) or split the tensor"
            )
    return blocks
