"""Shared test set-up: Hypothesis profiles, the gpu marker, backend parametrization."""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

# CI sets CI=true, which would load Hypothesis' built-in "ci" profile; pick ours explicitly.
settings.register_profile("dev", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("gpu", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("cudasim", max_examples=8, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
_default = "cudasim" if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" else \
    ("ci" if os.environ.get("CI") else "dev")
settings.load_profile(os.environ.get("QKERNELS_HYPOTHESIS_PROFILE", _default))


def _serialize_simulator_shared_arrays() -> None:
    """Numba's CUDA simulator (``FakeCUDAShared.array``) makes a block's shared array when
    the first thread reaches the ``cuda.shared.array`` line, keyed by file and line, with no
    lock: two threads that both find it missing each make one, and a reduction over it then
    sees part of the block (intermittent wrong absmax values). Replace it, for this test
    process only, by the same keying with the lookup and the creation under one lock.
    test_numba_util_cudasim.py reproduces the race."""
    import sys
    import threading
    import traceback

    import numpy as np
    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    original = kernelapi.FakeCUDAShared.array
    if getattr(original, "qkernels_serialized", False):
        return
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory, or unsupported
            return original(self, shape, dtype, alignment)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        caller = tuple(traceback.extract_stack(sys._getframe(1), limit=1)[-1])[0:2]
        with lock:
            made = self._allocations.get(caller)
            if made is None:
                made = self._allocations[caller] = np.empty(shape, dtype)
        return made

    array.qkernels_serialized = True
    kernelapi.FakeCUDAShared.array = array


if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    _serialize_simulator_shared_arrays()


def _has_cuda() -> bool:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return False
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


HAS_CUDA = _has_cuda()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


def gpu_backends() -> list[str]:
    """The GPU backends that load here (empty on a machine without a GPU)."""
    if not HAS_CUDA:
        return []
    from qkernels import available_backends
    return [b for b in available_backends() if b not in ("numpy", "cpu")]  # "cpu": host only
