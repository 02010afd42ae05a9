"""Compiling and caching the CUDA kernels of every family.

Each family keeps its CUDA C in a ``.cu`` file beside its launcher; ``get_kernel`` reads it
with importlib.resources, compiles one template instance with NVRTC for the current
device's architecture and returns it as a ``cupy.RawKernel``, cached per (process, device,
file, instance, options). Compiled modules are also kept on disk (``QKERNELS_CACHE_DIR``,
default ``~/.cache/qkernels``; ``cache_dirs()``): per kernel ``<key>.cubin`` and a
``<key>.json`` record of the key material (source and header digests, options, NVRTC
version), the lowered name and sha256 checksums, both written atomically and verified on
every load. A bad entry is recompiled and replaced (one warning per process); with an
unusable directory nothing is written anywhere and the kernel loads from memory (a
``MemoryKernel``, which launches like a RawKernel).

We call NVRTC ourselves instead of through ``cupy.RawModule(code=...)`` because CuPy adds
``-ftz=true`` to every compile, flushing float32 subnormals to zero in every arithmetic and
comparison instruction; the kernels must reproduce the NumPy oracle bit for bit, subnormal
inputs included (docs/FORMATS.md §0: no fast math). Here the compile options are NVRTC's defaults plus
the ones named below, nothing else.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.resources
import json
import os
import pathlib
import tempfile
import warnings
from typing import NamedTuple

_INCLUDE = str(importlib.resources.files(__package__))

# The storage-type codes of the kernels' DT template parameters: QK_DT_F32, QK_DT_F16 and
# QK_DT_BF16 in common.cuh (keep the two in step). The launchers write them into template
# instance names, e.g. f"quantize_blockwise<{DTYPE_CODES[dtype]}, {blocksize}>".
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}


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
    """``QKERNELS_CACHE_DIR``, or ``~/.cache/qkernels`` when it is unset or empty (an empty
    value must not mean the current directory)."""
    configured = os.environ.get("QKERNELS_CACHE_DIR", "").strip()
    return pathlib.Path(configured or os.path.join(os.path.expanduser("~"), ".cache", "qkernels"))


_warned: set = set()


def _warn_once(category: str, msg: str) -> None:
    """One RuntimeWarning per ``category`` per process (a bad cache must not flood the log)."""
    if category not in _warned:
        _warned.add(category)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


@functools.lru_cache(maxsize=None)
def _nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC that compiles here: part of every cache key."""
    from cupy_backends.cuda.libs import nvrtc
    return tuple(int(v) for v in nvrtc.getVersion())


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


class CachedCubin(NamedTuple):
    """A compiled kernel: ``path`` of its verified cache file (None when the cache directory
    is unusable: load ``cubin`` from memory), the cubin bytes and the kernel's lowered name."""
    path: str | None
    cubin: bytes
    lowered: str


class _BadEntry(Exception):
    """A cache entry that is present but must not be used (the message says why)."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _key_material(source: str, filename: str, name: str, options: tuple) -> dict:
    """Everything the cubin depends on; its JSON digest names the entry and the entry's
    JSON repeats it, so a file under the wrong name is caught."""
    return {"source_sha256": _sha256(source.encode()), "headers_sha256": _headers_digest(),
            "file": filename, "name": name, "options": list(options),
            "nvrtc": list(_nvrtc_version())}


def _entry_digest(material: dict, lowered: str, cubin_sha256: str) -> str:
    """Checksum of an entry's JSON fields (a hand-edited or planted field fails it)."""
    return _sha256(json.dumps([material, lowered, cubin_sha256], sort_keys=True).encode())


def _read_entry(folder: pathlib.Path, key: str, material: dict) -> tuple[bytes, str] | None:
    """(cubin, lowered) of a verified entry, None when there is none; _BadEntry when one is
    there but truncated, edited, or made for other key material."""
    path, meta = folder / f"{key}.cubin", folder / f"{key}.json"
    if not (path.exists() or meta.exists()):
        return None
    try:
        record = json.loads(meta.read_text())
        cubin = path.read_bytes()
    except (OSError, ValueError) as exc:
        raise _BadEntry(f"unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(record, dict) or not isinstance(record.get("lowered"), str):
        raise _BadEntry("its JSON record is not a qkernels cache record")
    if record.get("key") != material:
        raise _BadEntry("it was made for other source, options or NVRTC version")
    if record.get("cubin_size") != len(cubin) or record.get("cubin_sha256") != _sha256(cubin):
        raise _BadEntry(f"the cubin ({len(cubin)} bytes) does not match its recorded checksum "
                        "(truncated or overwritten)")
    want = _entry_digest(material, record["lowered"], record["cubin_sha256"])
    if record.get("entry_sha256") != want:
        raise _BadEntry("its JSON record does not match its checksum (edited)")
    return cubin, record["lowered"]


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    """Write ``path`` through a private temporary file in the same folder and a rename, so
    that a concurrent reader sees the old file or the new one, never part of one; the
    temporary file is removed if anything fails."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_entry(folder: pathlib.Path, key: str, material: dict, cubin: bytes,
                 lowered: str) -> pathlib.Path:
    """Store a verified-on-load entry: ``{key}.cubin`` first, then ``{key}.json`` holding the
    key material, the lowered name and the checksums. OSError if the folder is unusable."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.cubin"
    digest = _sha256(cubin)
    record = {"lowered": lowered, "name": material["name"], "file": material["file"],
              "key": material, "cubin_size": len(cubin), "cubin_sha256": digest,
              "entry_sha256": _entry_digest(material, lowered, digest)}
    _write_atomic(path, cubin)
    _write_atomic(folder / f"{key}.json", json.dumps(record, indent=1).encode())
    return path


def _cubin(package: str, filename: str, name: str, options: tuple) -> CachedCubin:
    """The cubin of kernel ``name`` from ``filename`` in ``package`` compiled with
    ``options``: a verified disk-cache entry, else compiled (and stored, atomically).

    A present but bad entry (truncated, edited, made for other inputs) is recompiled and
    replaced, with one warning per process. An unusable cache directory leaves no file
    anywhere: the result then has ``path=None`` and is loaded from memory."""
    source = _source(package, filename)
    material = _key_material(source, filename, name, options)
    key = _sha256(json.dumps(material, sort_keys=True).encode())[:32]
    folder = _cache_dir()
    try:
        entry = _read_entry(folder, key, material)
    except _BadEntry as exc:
        _warn_once("bad entry", f"qkernels: kernel cache entry {folder / key}.cubin is not "
                                f"usable: {exc}; recompiling and replacing it (once per process "
                                "this warning)")
        entry = None
    if entry is not None:
        return CachedCubin(str(folder / f"{key}.cubin"), *entry)
    cubin, lowered = _compile(source, filename, name, options)
    try:
        path = _write_entry(folder, key, material, cubin, lowered)
    except OSError as exc:
        _warn_once("unusable dir", f"qkernels: kernel cache directory {folder} is unusable "
                                   f"({type(exc).__name__}: {exc}); kernels load from memory and "
                                   "are compiled again in every process. Set QKERNELS_CACHE_DIR "
                                   "to a writable directory.")
        return CachedCubin(None, cubin, lowered)
    return CachedCubin(str(path), cubin, lowered)


# CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES in the CUDA driver API's CUfunction_attribute
_MAX_DYNAMIC_SHARED = 8


class MemoryKernel:
    """A kernel loaded from cubin bytes in memory (``cupy.cuda.function.Module.load``), for
    when there is no cache file to give ``cupy.RawModule(path=...)``. It offers the part of
    ``cupy.RawKernel`` the launchers use: ``kernel(grid, block, args, shared_mem=, stream=)``,
    ``.kernel`` (the ``cupy.cuda.Function``) and ``max_dynamic_shared_size_bytes``."""

    def __init__(self, module, lowered: str):
        self.module = module  # keeps the CUmodule loaded while the function lives
        self.kernel = module.get_function(lowered)
        self.name = lowered

    def __call__(self, grid, block, args, *, shared_mem: int = 0, stream=None):
        self.kernel(grid, block, args, shared_mem=shared_mem, stream=stream)

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        from cupy_backends.cuda.api import driver
        return driver.funcGetAttribute(_MAX_DYNAMIC_SHARED, self.kernel.ptr)

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, nbytes: int) -> None:
        from cupy_backends.cuda.api import driver
        driver.funcSetAttribute(self.kernel.ptr, _MAX_DYNAMIC_SHARED, int(nbytes))


def _load_kernel(entry: CachedCubin):
    """The kernel of ``entry`` on the current device: ``cupy.RawKernel`` from the verified
    cache file, or a MemoryKernel from the bytes when there is no file."""
    import cupy
    if entry.path is not None:
        return cupy.RawModule(path=entry.path).get_function(entry.lowered)
    module = cupy.cuda.function.Module()
    module.load(entry.cubin)
    return MemoryKernel(module, entry.lowered)


@functools.lru_cache(maxsize=None)
def _arch(device: int) -> str:
    import cupy
    return f"-arch=sm_{cupy.cuda.Device(device).compute_capability}"


@functools.lru_cache(maxsize=None)
def _kernel(device: int, package: str, filename: str, name: str, options: tuple):
    import cupy
    arch = () if any(o.startswith("-arch") for o in options) else (_arch(device),)
    full = ("--std=c++17", f"-I{_INCLUDE}") + arch + options
    entry = _cubin(package, filename, name, full)
    with cupy.cuda.Device(device):
        return _load_kernel(entry)


def get_kernel(package: str, filename: str, name: str, options: tuple = ()):
    """The compiled kernel ``name`` (a template instance such as ``quantize_blockwise<1, 256>``)
    from ``filename`` in ``package`` on the current device, as a ``cupy.RawKernel`` (a
    ``MemoryKernel`` when the disk cache is unusable: the same call, ``.kernel`` and
    ``max_dynamic_shared_size_bytes``). ``options``: extra NVRTC options, e.g. ``("-arch=sm_90a",)`` (the device's own
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
