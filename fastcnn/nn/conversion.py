"""`convert`: swap the layers of an existing model that fastcnn accelerates for fastcnn's.

Like ``nn.SyncBatchNorm.convert_sync_batchnorm``, it walks the module tree and returns the module
with each eligible layer replaced; the new layers take over the old ones' parameter objects, so an
optimizer built before the conversion keeps updating the same tensors, and ``state_dict`` keys and
values do not change (a converted model loads the original's checkpoints and back).

Today that is every depthwise ``nn.Conv2d`` (``groups == in_channels == out_channels``, any kernel
size, stride, padding, dilation and padding_mode) → `DepthwiseConv2d`: the depthwise layers of
torchvision's MobileNet v2/v3, EfficientNet, ConvNeXt, MNASNet and the like. Other convolutions
(dense, grouped with more than one channel a group, depthwise with a channel multiplier) are left
as they are, as are subclasses of ``nn.Conv2d`` other than ``nn.Conv2d`` itself, whose forward may
do something else, and convolutions whose weight is parametrised (weight normalisation).
"""
from torch import nn

from .depthwise_conv2d import DepthwiseConv2d

__all__ = ["convert", "convertible"]


def convertible(module: nn.Module) -> bool:
    """Whether `convert` replaces this module itself (not its children). Besides the depthwise
    shape, its weight must be a plain Parameter of its own: convolutions under weight
    normalisation or another parametrisation (whose class is no longer nn.Conv2d, or whose weight
    a hook recomputes) stay as they are."""
    return (
        type(module) is nn.Conv2d
        and module.groups == module.in_channels == module.out_channels
        and module._parameters.get("weight") is not None
    )


def _converted(conv: nn.Conv2d) -> DepthwiseConv2d:
    layer = DepthwiseConv2d._shell_of(conv)  # the parameters are conv's own
    layer.weight = conv.weight
    layer.bias = conv.bias
    layer.train(conv.training)
    # Hooks registered on the old layer would silently stop firing: carry them over (a handle
    # taken before the conversion still removes a hook from the old layer only).
    for name in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks",
                 "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
                 "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                 "_load_state_dict_post_hooks"):
        if hasattr(conv, name):
            getattr(layer, name).update(getattr(conv, name))
    # Which kind the backward hooks are (full or not): unset, the module would run neither.
    if hasattr(conv, "_is_full_backward_hook"):
        layer._is_full_backward_hook = conv._is_full_backward_hook
    return layer


def convert(module: nn.Module, verbose: bool = False) -> nn.Module:
    """Return ``module`` with every depthwise ``nn.Conv2d`` in it replaced by a `DepthwiseConv2d`.

    The tree is changed in place (children are reassigned on their parents) and returned; when
    ``module`` is itself a depthwise convolution the new layer is returned instead. The new layers
    share the old ones' ``weight`` and ``bias`` Parameters (same objects: no copy, optimizers and
    weight tying unaffected), stride, padding, dilation, padding_mode, training mode and hooks.
    ``verbose=True`` prints each replaced layer's qualified name. Calling it twice changes nothing
    the second time.

    Example::

        >>> model = torchvision.models.mobilenet_v2()
        >>> model = fastcnn.nn.convert(model)   # its 17 depthwise convolutions now run fastcnn's kernels
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"fastcnn.nn.convert: expected an nn.Module, got {type(module).__name__}")
    if convertible(module):
        if verbose:
            print("fastcnn.nn.convert: (the module itself) -> DepthwiseConv2d")
        return _converted(module)
    targets = [
        (f"{parent_name}.{name}" if parent_name else name, parent, name, child)
        for parent_name, parent in module.named_modules(remove_duplicate=False)
        for name, child in parent._modules.items()  # every registration (named_children skips repeats)
        if convertible(child)
    ]
    new_layers = {}  # one replacement per layer: a layer registered in two places stays one layer
    for qualified, parent, name, child in targets:
        if id(child) not in new_layers:
            new_layers[id(child)] = _converted(child)
        setattr(parent, name, new_layers[id(child)])
        if verbose:
            print(f"fastcnn.nn.convert: {qualified} -> DepthwiseConv2d")
    return module
