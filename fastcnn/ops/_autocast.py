"""Autocast (torch.autocast / torch.amp) for fastcnn's ops: each is cast as PyTorch casts the op it
replaces (the "Autocast Op Reference" of torch.amp):

- depthwise_conv2d as conv2d: floating inputs to the autocast dtype of the device ("lower");
- grid_sample and affine_grid_sample as grid_sampler: to float32 on the CPU ("fp32"); on CUDA to
  the widest floating input type, float32 if any input is ("promote"). affine_grid has no rule,
  so theta counts as the grid would.

The rules sit on the dispatcher's AutocastCPU and AutocastCUDA keys, before autograd: the casts are
recorded like any other op, gradients flow back to float32 parameters, and direct calls of
torch.ops.fastcnn.*, the Triton ops and torch.compile (through the Python dispatcher) see the same
casts. float64 tensors are never cast, as in PyTorch. Outside an autocast region the keys are
excluded and none of this runs.
"""
import torch

# One library object per process: the registrations live as long as it does.
_LIBRARY = torch.library.Library("fastcnn", "IMPL")

DEPTHWISE = {"cpu": "lower", "cuda": "lower"}
SAMPLER = {"cpu": "fp32", "cuda": "promote"}


def _eligible(value, device_type):
    return (
        isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and value.device.type == device_type
        and value.dtype != torch.float64
    )


def _target_dtype(policy, args, device_type):
    lower = torch.get_autocast_dtype(device_type)
    if policy == "lower":
        return lower
    if policy == "fp32":
        return torch.float32
    types = {a.dtype for a in args if _eligible(a, device_type)}
    return lower if types <= {lower} else torch.float32


def _cast(args, dtype, device_type):
    return tuple(a.to(dtype) if _eligible(a, device_type) else a for a in args)


def register(qualname, policies):
    """Registers the autocast rule of op `qualname` ("fastcnn::name") for each device type in
    `policies` (device type -> "lower", "fp32" or "promote")."""
    op = torch._library.utils.lookup_op(qualname)
    name = qualname.split("::")[1]
    for device_type, policy in policies.items():
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def cast_and_call(*args, _key=key, _device_type=device_type, _policy=policy):
            dtype = _target_dtype(_policy, args, _device_type)
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*_cast(args, dtype, _device_type))

        op.py_impl(key)(cast_and_call)
        _LIBRARY.impl(name, lambda _keyset, *args, _f=cast_and_call: _f(*args), key_name, with_keyset=True)


def enabled_for(tensor):
    """Whether an autocast region is active for this tensor's device type (the Python wrappers
    then leave mixed dtypes to the rules above instead of rejecting them)."""
    device_type = tensor.device.type
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
