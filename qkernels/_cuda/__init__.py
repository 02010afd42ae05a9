"""Compiling and caching the CuPy RawModules of every kernel family.

Each family keeps its CUDA C in a ``.cu`` file beside its launcher; ``get_kernel`` reads it
with importlib.resources, compiles it with NVRTC for the current device (without fast
math: the kernels reproduce the NumPy oracle bit for bit) and caches the module per
(process, device, file, template instance). CuPy's own on-disk cache keeps compiled
modules across runs; ``cache_dirs()`` names it for ``qkernels doctor``.
"""
from __future__ import annotations

import functools
import importlib.resources
import os

_INCLUDE = str(importlib.resources.files(__package__))


@functools.lru_cache(maxsize=None)
def _source(package: str, filename: str) -> str:
    return importlib.resources.files(package).joinpath(filename).read_text()


@functools.lru_cache(maxsize=None)
def _module(device: int, package: str, filename: str, names: tuple[str, ...], options: tuple):
    import cupy
    with cupy.cuda.Device(device):
        module = cupy.RawModule(code=_source(package, filename),
                                options=("--std=c++17", f"-I{_INCLUDE}") + options,
                                name_expressions=names)
        module.compile()
        return module


def get_kernel(package: str, filename: str, name: str, options: tuple = ()):
    """The compiled kernel ``name`` (a template instance such as
    ``quantize_blockwise<1, 256>``) from ``filename`` in ``package`` on the current device."""
    import cupy
    device = cupy.cuda.Device().id
    return _module(device, package, filename, (name,), options).get_function(name)


@functools.lru_cache(maxsize=None)
def multiprocessor_count(device: int) -> int:
    import cupy
    return cupy.cuda.runtime.getDeviceProperties(device)["multiProcessorCount"]


def cache_dirs() -> dict[str, str]:
    return {"cupy kernel cache": os.environ.get("CUPY_CACHE_DIR",
                                                os.path.expanduser("~/.cupy/kernel_cache")),
            "numba cache": os.environ.get("NUMBA_CACHE_DIR", "(beside the source / in memory)")}
