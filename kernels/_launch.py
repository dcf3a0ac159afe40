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
"""
import functools

import torch
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
