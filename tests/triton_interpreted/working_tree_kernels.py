"""The working tree's Triton kernels (kernels/), imported by path so that the checks depend neither
on fastcnn being installed nor on its C++ extension being built. kernels/ is loaded as a package of
its own name, so the kernel modules' relative imports (kernels/_launch.py) resolve inside it."""
import importlib
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = "_fastcnn_kernels_under_test"


def load(module):
    """kernels/<module>.py as PACKAGE.<module>."""
    if PACKAGE not in sys.modules:
        directory = os.path.join(REPO, "kernels")
        spec = importlib.util.spec_from_file_location(
            PACKAGE, os.path.join(directory, "__init__.py"), submodule_search_locations=[directory])
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{PACKAGE}.{module}")
