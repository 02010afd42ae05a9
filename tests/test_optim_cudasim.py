"""The Numba optimizer kernels under the CUDA simulator, against the reference, bit for bit,
at small sizes (1-3 blocks of 256 elements, 32-64 threads). Run by scripts/test.sh in its
own process with NUMBA_ENABLE_CUDASIM=1 (set before numba is imported)."""
import os

import numpy as np
import pytest

pytestmark = [
    pytest.mark.cudasim,
    pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1",
                       reason="needs NUMBA_ENABLE_CUDASIM=1 (scripts/test.sh sets it)"),
]

DTYPES = ["float16", "bfloat16", "float32"]


def _raw(x32, dtype):
    from reference.dtypes import float32_to_bf16_bits
    return float32_to_bf16_bits(x32) if dtype == "bfloat16" else x32.astype(dtype)


@pytest.mark.parametrize("n, dtype, threads, seed", [
    (1, "float16", 32, 0), (257, "bfloat16", 64, 1), (600, "float32", 32, 2)])
def test_numba_8bit_kernel_matches_reference(n, dtype, threads, seed):
    from numba import cuda
    from qkernels.optim import _numba
    from reference import optim as ref
    from reference.codebooks import dynamic_map
    from tests.strategies import round_to
    rng = np.random.default_rng(seed)
    q1, q2 = dynamic_map(True), dynamic_map(False)
    nb = -(-n // 256)
    p = _raw(round_to((rng.standard_normal(n) * 0.1).astype(np.float32), dtype), dtype)
    host = [p, np.full(n, 127, np.uint8), np.zeros(n, np.uint8), np.zeros(nb, np.float32),
            np.zeros(nb, np.float32)]
    dev = [cuda.to_device(x.copy()) for x in host]
    count = cuda.to_device(np.zeros(1, np.int32))
    want_count = 0
    for step in (1, 2):
        g32 = round_to((rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 0)).astype(np.float32), dtype)
        if step == 1 and n > 256:
            g32[:256] = 0.0                       # an all-zero block
        if step == 2:
            g32[rng.integers(0, n)] = np.nan
        s = ref.adam_scalars(1e-3, (0.9, 0.999), 1e-8, 0.01, step, 0.5 if step == 2 else 1.0)
        g = _raw(g32, dtype)
        want_count += ref.optimizer_update_8bit_blockwise(host[0], g, *host[1:], q1, q2, s, dtype)
        _numba.optimizer_update_8bit_blockwise(dev[0], cuda.to_device(g), *dev[1:], qmap1=q1, qmap2=q2,
                                               dtype=dtype, scalars=s, nonfinite=count, threads=threads)
        for d, h in zip(dev, host):
            np.testing.assert_array_equal(d.copy_to_host().view(np.uint8), h.view(np.uint8))
    assert count.copy_to_host()[0] == want_count


@pytest.mark.parametrize("n, dtype, seed", [(5, "float16", 3), (130, "bfloat16", 4),
                                             (64, "float32", 5)])
def test_numba_32bit_kernel_matches_reference(n, dtype, seed):
    from numba import cuda
    from qkernels.optim import _numba
    from reference import optim as ref
    from tests.strategies import round_to
    rng = np.random.default_rng(seed)
    p = _raw(round_to((rng.standard_normal(n) * 0.1).astype(np.float32), dtype), dtype)
    host = [p, np.zeros(n, np.float32), np.zeros(n, np.float32)]
    dev = [cuda.to_device(x.copy()) for x in host]
    for step in (1, 2):
        g32 = round_to((rng.standard_normal(n) * 0.01).astype(np.float32), dtype)
        g32[rng.integers(0, n)] = np.inf if step == 2 else g32[0]
        g = _raw(g32, dtype)
        s = ref.adam_scalars(1e-3, (0.9, 0.999), 1e-8, 0.0, step)
        ref.optimizer_update_32bit(host[0], g, host[1], host[2], s, dtype, np.float32(0.5))
        _numba.optimizer_update_32bit(dev[0], cuda.to_device(g), dev[1], dev[2], dtype=dtype, scalars=s,
                                      update_scale=0.5, threads=64)
        for d, h in zip(dev, host):
            np.testing.assert_array_equal(d.copy_to_host().view(np.uint8), h.view(np.uint8))


def test_public_api_under_numba_backend():
    import qkernels
    import qkernels.optim as qo
    rng = np.random.default_rng(0)
    n = 40
    p = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    args = [np.full(n, 127, np.uint8), np.zeros(n, np.uint8), np.zeros(1, np.float32),
            np.zeros(1, np.float32)]
    want_p, want = p.copy(), [a.copy() for a in args]
    qo.optimizer_update_8bit_blockwise(want_p, g, *want, lr=1e-3, step=1)
    from numba import cuda
    dp, dargs = cuda.to_device(p), [cuda.to_device(a) for a in args]
    with qkernels.use_backend("numba"):
        qo.optimizer_update_8bit_blockwise(dp, cuda.to_device(g), *dargs, lr=1e-3, step=1)
    np.testing.assert_array_equal(dp.copy_to_host(), want_p)
    for d, w in zip(dargs, want):
        np.testing.assert_array_equal(d.copy_to_host(), w)


def _host_case(kind, bits, seed=0):
    """(p, g, states..., counter) as host arrays of ``kind`` ("numpy": float16 p, g;
    "torch": bfloat16 CPU tensors), with a NaN and an Inf in g."""
    rng = np.random.default_rng(seed)
    n = 300
    p = (rng.standard_normal(n) * 0.1).astype(np.float32)
    g = (rng.standard_normal(n) * 0.01).astype(np.float32)
    g[5], g[290] = np.nan, np.inf
    if bits == 8:
        states = [np.full(n, 127, np.uint8), np.zeros(n, np.uint8), np.zeros(2, np.float32),
                  np.zeros(2, np.float32)]
    else:
        states = [np.zeros(n, np.float32), np.zeros(n, np.float32)]
    counter = np.zeros(1, np.int32)
    if kind == "numpy":
        return [p.astype(np.float16), g.astype(np.float16), *states, counter]
    import torch
    return [torch.from_numpy(p).bfloat16(), torch.from_numpy(g).bfloat16(),
            *(torch.from_numpy(s) for s in states), torch.from_numpy(counter)]


def _bits_of(x) -> np.ndarray:
    import torch
    if isinstance(x, torch.Tensor):
        x = (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy()
    return np.ascontiguousarray(x).view(np.uint8)


@pytest.mark.parametrize("how", ["use_backend", "env"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("bits", [8, 32])
def test_public_api_writes_host_arrays_back_under_numba_backend(bits, kind, how, monkeypatch):
    """Host data asked onto the numba backend is updated on device copies and written back
    into the caller's arrays (p, states, counter), bit for bit as the numpy backend does;
    g is left as it was."""
    import qkernels
    import qkernels.optim as qo
    update = qo.optimizer_update_8bit_blockwise if bits == 8 else qo.optimizer_update_32bit
    options = dict(lr=1e-2, weight_decay=0.01, gnorm_scale=0.5)
    want, got = _host_case(kind, bits), _host_case(kind, bits)
    g_before = _bits_of(got[1]).copy()
    with qkernels.use_backend("numpy"):
        for step in (1, 2):
            update(*want[:-1], step=step, nonfinite=want[-1], **options)
    if how == "env":
        monkeypatch.setenv("QKERNELS_BACKEND", "numba")
        for step in (1, 2):
            update(*got[:-1], step=step, nonfinite=got[-1], **options)
    else:
        with qkernels.use_backend("numba"):
            for step in (1, 2):
                update(*got[:-1], step=step, nonfinite=got[-1], **options)
    assert not np.array_equal(_bits_of(got[0]), _bits_of(_host_case(kind, bits)[0]))
    for i, (a, b) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(_bits_of(a), _bits_of(b), err_msg=f"argument {i}")
    assert int(got[-1][0]) == 4                                    # 2 per step
    np.testing.assert_array_equal(_bits_of(got[1]), g_before)
