"""Compiling and caching the CUDA kernels of every family.

Each family keeps its CUDA C in a ``.cu`` file beside its launcher; ``get_kernel`` reads it
with importlib.resources, compiles one template instance with NVRTC for the current
device's architecture and returns it as a ``cupy.RawKernel``, cached per (process, device,
file, instance, options). Compiled modules are also kept on disk (``cache_dirs()``).

We call NVRTC ourselves instead of through ``cupy.RawModule(code=...)`` because CuPy adds
``-ftz=true`` to every compile, flushing float32 subnormals to zero in every arithmetic and
comparison instruction; the kernels must reproduce the NumPy oracle bit for bit, subnormal
inputs included (SPEC.md: no fast math). Here the compile options are NVRTC's defaults plus
the ones named below, nothing else.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import os
import pathlib

_INCLUDE = str(importlib.resources.files(__package__))


@functools.lru_cache(maxsize=None)
def _source(package: str, filename: str) -> str:
    return importlib.resources.files(package).joinpath(filename).read_text()


@functools.lru_cache(maxsize=None)
def _headers_digest() -> str:
    """Digest of the shared headers every .cu file may include (part of the cache key)."""
    h = hashlib.sha256()
    for p in sorted(pathlib.Path(_INCLUDE).glob("*.cuh")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("QKERNELS_CACHE_DIR",
                                       os.path.join(os.path.expanduser("~"), ".cache", "qkernels")))


def _compile(source: str, filename: str, name: str, options: tuple) -> tuple[bytes, str]:
    """(cubin, lowered name of ``name``) from NVRTC."""
    from cupy_backends.cuda.libs import nvrtc
    prog = nvrtc.createProgram(source, filename, [], [])
    try:
        nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, list(options))
        except Exception as e:
            log = nvrtc.getProgramLog(prog)
            raise RuntimeError(f"NVRTC could not compile {name} from {filename}: {e}\n{log}") from None
        return bytes(nvrtc.getCUBIN(prog)), nvrtc.getLoweredName(prog, name)
    finally:
        nvrtc.destroyProgram(prog)


def _cubin(package: str, filename: str, name: str, options: tuple) -> tuple[str, str]:
    """(path of the cached cubin, lowered name): compiled on a cache miss."""
    from cupy_backends.cuda.libs import nvrtc
    source = _source(package, filename)
    key = hashlib.sha256(json.dumps([source, _headers_digest(), filename, name, list(options),
                                     list(nvrtc.getVersion())]).encode()).hexdigest()[:32]
    folder = _cache_dir()
    path, meta = folder / f"{key}.cubin", folder / f"{key}.json"
    if path.exists() and meta.exists():
        try:
            return str(path), json.loads(meta.read_text())["lowered"]
        except (OSError, ValueError, KeyError):
            pass
    cubin, lowered = _compile(source, filename, name, options)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{key}.{os.getpid()}.tmp"
        tmp.write_bytes(cubin)
        os.replace(tmp, path)  # atomic: concurrent processes never read half a file
        meta.write_text(json.dumps({"lowered": lowered, "name": name, "file": filename}))
    except OSError:  # an unwritable cache: load from a private temporary file instead
        import tempfile
        fd, tmp_path = tempfile.mkstemp(suffix=".cubin")
        with os.fdopen(fd, "wb") as f:
            f.write(cubin)
        return tmp_path, lowered
    return str(path), lowered


@functools.lru_cache(maxsize=None)
def _arch(device: int) -> str:
    import cupy
    return f"-arch=sm_{cupy.cuda.Device(device).compute_capability}"


@functools.lru_cache(maxsize=None)
def _kernel(device: int, package: str, filename: str, name: str, options: tuple):
    import cupy
    arch = () if any(o.startswith("-arch") for o in options) else (_arch(device),)
    full = ("--std=c++17", f"-I{_INCLUDE}") + arch + options
    path, lowered = _cubin(package, filename, name, full)
    with cupy.cuda.Device(device):
        return cupy.RawModule(path=path).get_function(lowered)


def get_kernel(package: str, filename: str, name: str, options: tuple = ()):
    """The compiled kernel ``name`` (a template instance such as ``quantize_blockwise<1, 256>``)
    from ``filename`` in ``package`` on the current device, as a ``cupy.RawKernel``.
    ``options``: extra NVRTC options, e.g. ``("-arch=sm_90a",)`` (the device's own
    ``-arch=sm_XY`` otherwise)."""
    import cupy
    return _kernel(cupy.cuda.runtime.getDevice(), package, filename, name, tuple(options))


def ptr(a) -> int:
    """Device pointer of a CuPy array or torch tensor (0 for None)."""
    if a is None:
        return 0
    return a.data_ptr() if hasattr(a, "data_ptr") else a.data.ptr


def aligned16(*ptrs: int) -> bool:
    """Whether every pointer is 16-byte aligned (the kernels' vector loads)."""
    return all(p % 16 == 0 for p in ptrs)


def current_device() -> int:
    import cupy
    return cupy.cuda.runtime.getDevice()  # (no Device object: the launchers call this per launch)


@functools.lru_cache(maxsize=None)
def multiprocessor_count(device: int) -> int:
    import cupy
    return cupy.cuda.runtime.getDeviceProperties(device)["multiProcessorCount"]


def cache_dirs() -> dict[str, str]:
    return {"kernel cache (NVRTC cubins)": str(_cache_dir()),
            "numba cache": os.environ.get("NUMBA_CACHE_DIR", "(beside the source / in memory)")}
