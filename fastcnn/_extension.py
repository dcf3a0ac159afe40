"""Loads the compiled extension fastcnn._C, once, and remembers why it failed if it did.

Every Python registration that refers to a C++ op is guarded by `has_ops()`, so a missing or
broken build degrades to the reference implementation instead of breaking `import fastcnn`.
"""
import importlib
import warnings

# build_info is parsed once, when _C loads: torch.compile traces the backend choice on every op
# call, and a torch op that returns a str cannot be traced (dynamo: "torch.* op returned
# non-Tensor"), while a dict read from here can.
_state = {"loaded": None, "error": None, "build_info": {}}


def load():
    if _state["loaded"] is None:
        import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

        try:
            importlib.import_module("fastcnn._C")
            _state["build_info"] = dict(item.split("=", 1) for item in torch_ops()._build_info().split(";"))
            _state["loaded"] = True
        except (ImportError, OSError) as exc:
            _state["loaded"] = False
            _state["error"] = (
                f"fastcnn._C could not be loaded ({exc}). Rebuild it against the installed torch with "
                "`pip install --no-build-isolation -e .`; until then fastcnn falls back to its "
                "pure-PyTorch reference implementation."
            )
            warnings.warn(_state["error"], RuntimeWarning, stacklevel=2)
    return _state["loaded"]


def has_ops():
    loaded = _state["loaded"]
    return loaded if loaded is not None else bool(load())


def load_error():
    load()
    return _state["error"]


def build_info():
    """The build configuration compiled into _C, as a dict (empty when _C is missing)."""
    has_ops()
    return dict(_state["build_info"])


def torch_ops():
    import torch

    return torch.ops.fastcnn
