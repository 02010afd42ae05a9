"""Backend selection (qkernels/_backend.py): ``use_backend`` is context-local, so asyncio
tasks and threads each keep their own choice and leave in any order."""
from __future__ import annotations

import asyncio
import threading

import pytest

from qkernels._backend import BACKENDS, backend_status, choose, requested_backend, use_backend


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    monkeypatch.delenv("QKERNELS_BACKEND", raising=False)


def test_use_backend_nests_and_restores():
    assert requested_backend() is None
    with use_backend("numba"):
        assert requested_backend() == "numba"
        with use_backend("numpy"):
            assert requested_backend() == "numpy"
        assert requested_backend() == "numba"
    assert requested_backend() is None


def test_use_backend_restores_after_an_exception():
    with pytest.raises(KeyError):
        with use_backend("numba"):
            raise KeyError("inside")
    assert requested_backend() is None


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"backend must be one of cupy, numba, cpu, numpy; got 'cuda'"):
        with use_backend("cuda"):
            pass


def test_environment_variable_is_the_fallback(monkeypatch):
    monkeypatch.setenv("QKERNELS_BACKEND", "numpy")
    assert requested_backend() == "numpy"
    with use_backend("numba"):
        assert requested_backend() == "numba"
    assert requested_backend() == "numpy"


def test_asyncio_tasks_interleaving_keep_their_own_backend():
    """Task a enters numba, task b enters cupy while a is suspended inside its block; a must
    still see numba, and the exits (a first, then b) must each undo only their own entry."""
    seen: dict[str, list] = {"a": [], "b": []}

    async def task(name, backend, entered, other_entered, leave_first):
        with use_backend(backend):
            seen[name].append(requested_backend())
            entered.set()
            await other_entered.wait()          # the other task is now inside its block
            seen[name].append(requested_backend())
            if not leave_first:
                await asyncio.sleep(0)          # let the other one leave first
                await asyncio.sleep(0)
            seen[name].append(requested_backend())
        seen[name].append(requested_backend())

    async def main():
        a_in, b_in = asyncio.Event(), asyncio.Event()
        await asyncio.gather(task("a", "numba", a_in, b_in, True),
                             task("b", "cupy", b_in, a_in, False))
        return requested_backend()

    outside = asyncio.run(main())
    assert seen["a"] == ["numba", "numba", "numba", None]
    assert seen["b"] == ["cupy", "cupy", "cupy", None]
    assert outside is None and requested_backend() is None


def test_a_task_inherits_the_backend_where_it_was_created():
    async def child():
        return requested_backend()

    async def main():
        with use_backend("numba"):
            inside = asyncio.create_task(child())
        outside = asyncio.create_task(child())
        return await inside, await outside

    assert asyncio.run(main()) == ("numba", None)


def test_threads_keep_their_own_backend():
    barrier = threading.Barrier(2, timeout=10)
    seen: dict[str, list] = {}

    def worker(name, backend):
        got = [requested_backend()]             # a new thread starts with no choice
        with use_backend(backend):
            barrier.wait()                      # both threads are inside their blocks
            got.append(requested_backend())
            barrier.wait()
        got.append(requested_backend())
        seen[name] = got

    with use_backend("numpy"):
        threads = [threading.Thread(target=worker, args=("t1", "numba")),
                   threading.Thread(target=worker, args=("t2", "cupy"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
        assert requested_backend() == "numpy"
    assert seen == {"t1": [None, "numba", None], "t2": [None, "cupy", None]}


def test_backend_list_and_cpu_status():
    """"cpu" (Numba CPU kernels) sits between the GPU backends and the reference; it loads
    wherever numba imports, GPU or not."""
    assert BACKENDS == ("cupy", "numba", "cpu", "numpy")
    ok, why = backend_status("cpu")
    assert ok, why
    assert "numba" in why


def _table(*names):
    return {name: (lambda name=name: name) for name in names}


def test_host_data_tries_asked_then_cpu_then_numpy():
    name, impl = choose(_table("numpy", "cpu"), on_gpu=False)
    assert name == "cpu" and impl() == "cpu"   # the guard calls the table's entry
    assert choose(_table("numpy"), on_gpu=False)[0] == "numpy"   # no "cpu" entry: silently numpy
    with use_backend("numpy"):
        assert choose(_table("numpy", "cpu"), on_gpu=False)[0] == "numpy"
    with use_backend("cpu"):
        assert choose(_table("numpy", "cpu"), on_gpu=False)[0] == "cpu"
        assert choose(_table("numpy"), on_gpu=False)[0] == "numpy"


def test_gpu_data_never_falls_to_cpu_unasked():
    order = [choose(_table(*names), on_gpu=True)[0] for names in (("numpy", "cpu"), ("cpu", "numpy"))]
    assert order == ["numpy", "numpy"]


def test_entry_of_a_companion_table():
    from qkernels._backend import entry
    assert entry(_table("numpy", "cpu"), "cpu")() == "cpu"
    assert entry(_table("numpy"), "cpu")() == "numpy"        # no "cpu" entry: the reference
    assert entry(_table("numpy", "cupy"), "cupy")() == "cupy"
