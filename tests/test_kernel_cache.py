"""The on-disk kernel cache of qkernels/_cuda (no GPU, no NVRTC: ``_compile`` and the NVRTC
version are replaced by fakes). Entries are written atomically with checksums and verified
on load; a bad entry is recompiled with one warning; an unusable cache directory leaves no
file anywhere and the kernel loads from memory."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import types
import warnings

import pytest

import qkernels._cuda as kc

PACKAGE, FILE, NAME = "qkernels.blockwise", "blockwise.cu", "quantize_blockwise<1, 256>"
LOWERED = "_Z18quantize_blockwiseILi1ELi256EEvv"
OPTIONS = ("--std=c++17", "-arch=sm_90")


@pytest.fixture
def compiles(monkeypatch, tmp_path):
    """Fake NVRTC: records each compile; a fresh warn-once state and a private system temp
    dir (to see stray files) for every test."""
    calls: list[str] = []

    def fake_compile(source, filename, name, options):
        calls.append(name)
        return b"\x7fELF fake cubin of " + name.encode() + bytes(range(256)) * 4, LOWERED

    monkeypatch.setattr(kc, "_compile", fake_compile)
    monkeypatch.setattr(kc, "_nvrtc_version", lambda: (12, 6))
    monkeypatch.setattr(kc, "_warned", set())
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    monkeypatch.setenv("QKERNELS_CACHE_DIR", str(tmp_path / "cache"))
    return calls


def _entry_files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_empty_cache_dir_variable_means_the_default(monkeypatch, tmp_path, compiles):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("QKERNELS_CACHE_DIR", "")
    assert kc._cache_dir() == home / ".cache" / "qkernels"
    entry = kc._cubin(PACKAGE, FILE, NAME, OPTIONS)
    assert os.listdir(cwd) == []
    assert entry.path is not None and entry.path.startswith(str(home / ".cache" / "qkernels"))


def test_entry_is_written_with_its_checksums_and_reused(tmp_path, compiles):
    first = kc._cubin(PACKAGE, FILE, NAME, OPTIONS)
    folder = tmp_path / "cache"
    key = os.path.basename(first.path)[:-len(".cubin")]
    assert _entry_files(folder) == [f"{key}.cubin", f"{key}.json"]      # no temporary left
    assert (folder / f"{key}.cubin").read_bytes() == first.cubin
    record = json.loads((folder / f"{key}.json").read_text())
    assert record["lowered"] == LOWERED and record["cubin_size"] == len(first.cubin)
    assert record["cubin_sha256"] == hashlib.sha256(first.cubin).hexdigest()
    material = record["key"]
    assert material["nvrtc"] == [12, 6] and material["options"] == list(OPTIONS)
    assert material["name"] == NAME and material["file"] == FILE
    source = kc._source(PACKAGE, FILE).encode()
    assert material["source_sha256"] == hashlib.sha256(source).hexdigest()
    again = kc._cubin(PACKAGE, FILE, NAME, OPTIONS)
    assert again == first and compiles == [NAME]                        # served from disk
    other = kc._cubin(PACKAGE, FILE, NAME, OPTIONS + ("-lineinfo",))
    assert other.path != first.path and len(compiles) == 2              # options are key material


def _corrupt_and_reload(tmp_path, damage):
    first = kc._cubin(PACKAGE, FILE, NAME, OPTIONS)
    cubin_path = first.path
    json_path = cubin_path[:-len(".cubin")] + ".json"
    damage(cubin_path, json_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = kc._cubin(PACKAGE, FILE, NAME, OPTIONS)
    return first, again, caught


def test_truncated_cubin_is_recompiled_with_a_warning(tmp_path, compiles):
    def truncate(cubin_path, json_path):
        with open(cubin_path, "r+b") as f:
            f.truncate(10)

    first, again, caught = _corrupt_and_reload(tmp_path, truncate)
    assert compiles == [NAME, NAME]
    assert again.cubin == first.cubin and again.lowered == LOWERED
    assert open(again.path, "rb").read() == first.cubin                 # replaced on disk
    assert any("does not match its recorded checksum" in str(w.message) for w in caught)


def test_planted_lowered_name_is_rejected(tmp_path, compiles):
    def plant(cubin_path, json_path):
        record = json.loads(open(json_path).read())
        record["lowered"] = "_Z8evil_onev"
        open(json_path, "w").write(json.dumps(record))

    _, again, caught = _corrupt_and_reload(tmp_path, plant)
    assert again.lowered == LOWERED and compiles == [NAME, NAME]
    assert any("does not match its checksum (edited)" in str(w.message) for w in caught)


def test_entry_made_for_other_inputs_is_rejected(tmp_path, compiles):
    """Another kernel's valid entry copied under this key (self-consistent checksums, wrong
    key material) is not served."""
    def swap(cubin_path, json_path):
        other = kc._cubin(PACKAGE, FILE, "dequantize_blockwise<1, 256>", OPTIONS)
        open(cubin_path, "wb").write(other.cubin)
        open(json_path, "w").write(open(other.path[:-len(".cubin")] + ".json").read())

    first, again, caught = _corrupt_and_reload(tmp_path, swap)
    assert again.cubin == first.cubin
    assert any("made for other source, options or NVRTC version" in str(w.message) for w in caught)


def test_bad_entries_warn_once_per_process(tmp_path, compiles):
    for name in ("a<1>", "b<2>"):
        entry = kc._cubin(PACKAGE, FILE, name, OPTIONS)
        open(entry.path, "wb").write(b"0123456789")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kc._cubin(PACKAGE, FILE, "a<1>", OPTIONS)
        kc._cubin(PACKAGE, FILE, "b<2>", OPTIONS)
    assert len([w for w in caught if "kernel cache entry" in str(w.message)]) == 1
    assert compiles == ["a<1>", "b<2>", "a<1>", "b<2>"]


@pytest.mark.parametrize("how", ["a file in the way", "read-only"])
def test_unusable_cache_dir_leaves_no_files_and_loads_from_memory(monkeypatch, tmp_path,
                                                                  compiles, how):
    if how == "a file in the way":
        blocker = tmp_path / "blocker"
        blocker.write_text("not a directory")
        monkeypatch.setenv("QKERNELS_CACHE_DIR", str(blocker / "cache"))
    else:
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            monkeypatch.setattr(kc.tempfile, "mkstemp", _refuse_mkstemp)  # root ignores modes
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        monkeypatch.setenv("QKERNELS_CACHE_DIR", str(folder))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = kc._cubin(PACKAGE, FILE, NAME, OPTIONS)
        b = kc._cubin(PACKAGE, FILE, "other<2>", OPTIONS)
    assert a.path is None and b.path is None and a.cubin.startswith(b"\x7fELF")
    assert a.lowered == LOWERED
    assert os.listdir(tempfile.gettempdir()) == []                     # no stray cubins
    if how == "read-only":
        assert os.listdir(tmp_path / "ro") == []
        (tmp_path / "ro").chmod(0o755)
    unusable = [w for w in caught if "cache directory" in str(w.message)]
    assert len(unusable) == 1 and "QKERNELS_CACHE_DIR" in str(unusable[0].message)


def _refuse_mkstemp(*args, **kwargs):
    raise PermissionError(13, "Permission denied (simulated read-only directory)")


def test_failed_write_removes_its_temporary_file(monkeypatch, tmp_path, compiles):
    def failing_replace(src, dst):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(kc.os, "replace", failing_replace)
    with pytest.warns(RuntimeWarning, match="is unusable .*No space left"):
        entry = kc._cubin(PACKAGE, FILE, NAME, OPTIONS)
    assert entry.path is None
    assert _entry_files(tmp_path / "cache") == []


# --- loading: the path route and the memory route, with a stand-in for CuPy ---------------------

class _FakeFunction:
    def __init__(self, name):
        self.name, self.ptr, self.launches = name, 4242, []

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        self.launches.append((grid, block, args, shared_mem, stream))


class _FakeModule:
    loaded: list = []

    def load(self, cubin):
        _FakeModule.loaded.append(cubin)

    def get_function(self, name):
        return _FakeFunction(name)


def _fake_cupy(monkeypatch):
    raw_modules = []

    class RawModule:
        def __init__(self, *, path):
            raw_modules.append(path)

        def get_function(self, name):
            return ("RawKernel", name)

    cupy = types.ModuleType("cupy")
    cupy.RawModule = RawModule
    cupy.cuda = types.SimpleNamespace(function=types.SimpleNamespace(Module=_FakeModule))
    attrs = []
    driver = types.SimpleNamespace(funcSetAttribute=lambda f, a, v: attrs.append((f, a, v)),
                                   funcGetAttribute=lambda a, f: 99)
    backends = types.ModuleType("cupy_backends")
    api = types.ModuleType("cupy_backends.cuda.api")
    api.driver = driver
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy_backends", backends)
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda", types.ModuleType("cupy_backends.cuda"))
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.api", api)
    monkeypatch.setattr(_FakeModule, "loaded", [])
    return raw_modules, attrs


def test_a_cached_entry_loads_from_its_file(monkeypatch):
    raw_modules, _ = _fake_cupy(monkeypatch)
    kernel = kc._load_kernel(kc.CachedCubin("/cache/k.cubin", b"bytes", LOWERED))
    assert kernel == ("RawKernel", LOWERED) and raw_modules == ["/cache/k.cubin"]
    assert _FakeModule.loaded == []


def test_without_a_file_the_kernel_loads_from_memory(monkeypatch):
    raw_modules, attrs = _fake_cupy(monkeypatch)
    kernel = kc._load_kernel(kc.CachedCubin(None, b"\x7fELF in memory", LOWERED))
    assert raw_modules == [] and _FakeModule.loaded == [b"\x7fELF in memory"]
    assert isinstance(kernel, kc.MemoryKernel) and kernel.kernel.name == LOWERED
    kernel((3,), (128,), (1, 2), shared_mem=64, stream="s")
    assert kernel.kernel.launches == [((3,), (128,), (1, 2), 64, "s")]
    kernel.max_dynamic_shared_size_bytes = 100_000
    assert attrs == [(4242, kc._MAX_DYNAMIC_SHARED, 100_000)]
    assert kernel.max_dynamic_shared_size_bytes == 99
