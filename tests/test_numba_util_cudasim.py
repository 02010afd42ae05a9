"""The CUDA-simulator fix in tests/conftest.py (_serialize_simulator_shared_arrays): a block's
shared arrays are one array per (file, line) for every thread, even when thread switches land
inside their creation."""
import os
import time

import numpy as np
import pytest
from numba import cuda, float32

pytestmark = [
    pytest.mark.cudasim,
    pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1",
                       reason="needs NUMBA_ENABLE_CUDASIM=1 (scripts/test.sh sets it)"),
]


@cuda.jit
def two_arrays(out):
    a = cuda.shared.array(32, float32)
    b = cuda.shared.array(32, float32)
    t = cuda.threadIdx.x
    a[t] = t
    b[t] = 2 * t
    cuda.syncthreads()
    if t == 0:
        s = float32(0.0)
        for i in range(32):
            s += a[i] + b[i]
        out[0] = s


def test_shared_arrays_are_shared_by_the_whole_block(monkeypatch):
    from numba.cuda.simulator import kernelapi

    assert getattr(kernelapi.FakeCUDAShared.array, "qkernels_serialized", False)  # conftest's

    class SlowNumpy:  # widens the simulator's create-on-first-use window to 2 ms
        def __getattr__(self, name):
            return getattr(np, name)

        def empty(self, *args, **kwargs):
            time.sleep(0.002)
            return np.empty(*args, **kwargs)

    monkeypatch.setattr(kernelapi, "np", SlowNumpy())

    out = np.zeros(1, np.float32)
    two_arrays[1, 32](out)
    assert out[0] == 3 * sum(range(32))
