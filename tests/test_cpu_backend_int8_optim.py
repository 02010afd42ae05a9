"""The Numba CPU kernels of the int8 forward (qkernels/int8/_cpu.py) and the 8-bit Adam step
(qkernels/optim/_cpu.py) against the NumPy reference: int8 codes, statistics and matmul
outputs bit-identical, optimizer p / codes / absmax / non-finite counts bit-identical over
several steps; the layers and optimizers that use them; the ``--ops cpu`` benchmark section."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import qkernels
from qkernels.int8 import _cpu as int8_cpu
from qkernels.optim import _cpu as optim_cpu
from reference import int8 as ref_int8
from reference import optim as ref_optim
from reference.codebooks import dynamic_map
from reference.dtypes import bf16_bits_to_float32, float32_to_bf16_bits
from tests.strategies import as_numpy, as_torch, float_arrays

TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _bits(a) -> np.ndarray:
    a = a.detach().contiguous() if isinstance(a, torch.Tensor) else np.ascontiguousarray(a)
    if isinstance(a, torch.Tensor):
        a = a.view(torch.int16).numpy() if a.dtype == torch.bfloat16 else a.numpy()
    return a.view(np.uint8)


# --- int8: row quantization ---------------------------------------------------------------

@given(data=st.data(), rows=st.integers(1, 40), cols=st.integers(1, 300),
       threshold=st.sampled_from([0.0, 6.0, 0.5, 1e-3]))
def test_quantize_rows_matches_reference(data, rows, cols, threshold):
    x32, dtype = data.draw(float_arrays(shape=(rows, cols), specials=True))
    q, stats, cols_out = int8_cpu.quantize_rows_torch(as_torch(x32, dtype), threshold)
    rq, rstats, rcols = ref_int8.int8_vectorwise_quant(as_numpy(x32, dtype), threshold)
    np.testing.assert_array_equal(q.numpy(), rq)
    # NaN rows give NaN statistics (payloads follow each library's float16 -> float32 cast)
    np.testing.assert_array_equal(stats.numpy(), rstats)
    if threshold == 0:
        assert cols_out is None and rcols is None
    else:
        np.testing.assert_array_equal(cols_out.numpy(), rcols)


# --- int8: the GEMM and its epilogue -------------------------------------------------------

@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # float16 outputs past 65504
@given(seed=st.integers(0, 2**32 - 1), M=st.integers(1, 40), N=st.integers(1, 70),
       K=st.sampled_from([1, 3, 16, 64, 255, 1024, 1025, 2100]),
       out_dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
       bias_dtype=st.sampled_from([None, "float16", "bfloat16", "float32"]),
       int_mm=st.booleans())
def test_gemm_dequant_matches_reference(seed, M, N, K, out_dtype, bias_dtype, int_mm):
    rng = np.random.default_rng(seed)
    CA = rng.integers(-127, 128, (M, K)).astype(np.int8)
    CB = rng.integers(-127, 128, (N, K)).astype(np.int8)
    SCA = (rng.uniform(0, 10, M) * 10.0 ** rng.uniform(-4, 3)).astype(np.float32)
    SCB = (rng.uniform(0, 10, N) * 10.0 ** rng.uniform(-4, 3)).astype(np.float32)
    bias = None if bias_dtype is None else as_numpy(rng.standard_normal(N).astype(np.float32), bias_dtype)
    expect = ref_int8.int8_mm_dequant(ref_int8.int8_linear_matmul(CA, CB), SCA, SCB, bias, out_dtype)
    saved = int8_cpu._state.get("int_mm")
    int8_cpu._state["int_mm"] = int_mm and int8_cpu._int_mm_fast()  # also the float32 chunked GEMM
    try:
        tb = None if bias is None else torch.from_numpy(np.asarray(bias, np.float32)).to(TORCH[bias_dtype])
        out = int8_cpu.gemm_dequant_torch(torch.from_numpy(CA), torch.from_numpy(CB),
                                          torch.from_numpy(SCA), torch.from_numpy(SCB), tb,
                                          TORCH[out_dtype])
        C = int8_cpu.int32_matmul_torch(torch.from_numpy(CA), torch.from_numpy(CB))
    finally:
        int8_cpu._state["int_mm"] = saved
    np.testing.assert_array_equal(C.numpy(), ref_int8.int8_linear_matmul(CA, CB))
    assert out.dtype == TORCH[out_dtype]
    np.testing.assert_array_equal(_bits(out), _bits(expect))


# --- int8: the layer forward ---------------------------------------------------------------

def _layer(threshold, in_f, out_f, seed=0, bias=True):
    from torch_ops.linear8bit import Linear8bitLt
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    layer = Linear8bitLt(in_f, out_f, bias=bias, has_fp16_weights=False, threshold=threshold)
    layer.load_state_dict(lin.state_dict())
    return layer.to("cpu")


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(32, 12, 384, 1536), (3, 5, 1536, 384), (1, 1, 7, 3)])
def test_linear8bitlt_forward_matches_reference_path(threshold, dtype, shape):
    """The CPU forward against the NumPy reference route (use_backend("numpy")): the int8
    part is exact and the outlier product the same torch addmm, so the outputs and the
    recorded outlier columns are identical."""
    B, T, K, N = shape
    layer = _layer(threshold, K, N).to(TORCH[dtype])
    torch.manual_seed(1)
    x = torch.randn(B, T, K)
    x[..., min(5, K - 1)] = 30.0  # an outlier column for threshold 6
    x[..., 0] *= 9  # and some outliers elsewhere, in some rows
    x = x.to(TORCH[dtype])
    with torch.no_grad():
        fast = layer(x)
        fast_cols = getattr(layer._plan, "cols", None)
        with qkernels.use_backend("numpy"):
            layer._plan = None
            slow = layer(x)
            slow_cols = getattr(layer._plan, "cols", None)
    assert fast.dtype == x.dtype and fast.shape == (B, T, N)
    np.testing.assert_array_equal(_bits(fast), _bits(slow))
    if threshold > 0:
        np.testing.assert_array_equal(fast_cols.numpy(), slow_cols.numpy())
        assert fast_cols.numel() >= 1


def test_linear8bitlt_backward_uses_the_same_forward():
    layer = _layer(6.0, 64, 32)
    x = torch.randn(4, 64, requires_grad=True)
    out = layer(x)
    with qkernels.use_backend("numpy"):
        layer._plan = None
        ref_out = layer(x.detach())
    np.testing.assert_array_equal(out.detach().numpy(), ref_out.detach().numpy())
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_forward_falls_back_to_the_reference_when_numba_fails(monkeypatch):
    from numba.core.errors import TypingError
    import qkernels.int8.ops as ops
    layer = _layer(0.0, 48, 16)
    x = torch.randn(5, 48)
    with torch.no_grad():
        expect = layer(x)

    def broken(*args):
        raise TypingError("simulated compile failure")
    import qkernels._backend as backend
    # the public ops' "cpu" entries see the same broken kernel: keep their give-up record local
    monkeypatch.setattr(backend, "_cpu_failed", set())
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.setitem(int8_cpu._state, "ready", None)
    monkeypatch.setattr(int8_cpu, "_quant_rows_kernel", broken)
    with pytest.warns(RuntimeWarning, match="failed to compile"):
        assert int8_cpu.ready() is False
    assert ops._host_kernels(x) is None
    layer._plan = None
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="failed to compile"):
        out = layer(x)  # the public op's "cpu" entry gives up on the broken kernel too
    np.testing.assert_array_equal(out.numpy(), expect.numpy())


# --- int8: the op-table entries ------------------------------------------------------------

@given(data=st.data(), rows=st.integers(1, 30), cols=st.integers(1, 200),
       threshold=st.sampled_from([0.0, 6.0, 0.5]))
def test_table_functions_match_numpy_backend(data, rows, cols, threshold):
    """Each entry of the int8 op tables gives the NumPy backend's bits; a NaN output is
    compared as NaN only, since its sign and payload depend on the order in which the kernel
    meets a NaN operand and an invalid 0 * inf (the formats leave them undefined)."""
    from qkernels import int8 as I
    x32, dtype = data.draw(float_arrays(shape=(rows, cols), specials=True))
    raw = I._raw(x32, dtype)  # the NumPy backend's storage (bfloat16 as uint16 bits)
    outs = {}
    for name, fns in (("numpy", I), ("cpu", int8_cpu)):
        q = np.empty((rows, cols), np.int8)
        stats = np.empty(rows, np.float32)
        flags = np.zeros(cols, np.uint8) if threshold > 0 else None
        qf = I._numpy_quantize_rows if name == "numpy" else int8_cpu.quantize_rows
        qf(raw, q, stats, dtype=dtype, stats_dtype="float32", threshold=threshold, flags=flags)
        C = np.empty((rows, rows), np.int32)
        gf = I._numpy_gemm if name == "numpy" else int8_cpu.gemm
        gf(q, q, C, out_dtype="int32")
        out = np.empty((rows, rows), np.float32)
        md = I._numpy_mm_dequant if name == "numpy" else int8_cpu.mm_dequant
        md(C, stats, stats, out, out_dtype="float32", bias=stats, bias_dtype="float32")
        outs[name] = (q, stats, None if flags is None else flags.astype(bool), C, out)
    for a, b in zip(outs["numpy"], outs["cpu"]):
        if a is None:
            assert b is None
        elif a.dtype == np.float32:
            np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
            np.testing.assert_array_equal(a[~np.isnan(a)].view(np.uint32), b[~np.isnan(b)].view(np.uint32))
        else:
            np.testing.assert_array_equal(a, b)


# --- the 8-bit Adam step -------------------------------------------------------------------

def _grads(rng, n, dtype, specials):
    g = (rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 1)).astype(np.float32)
    if specials:
        for v in (np.nan, np.inf, -np.inf):
            g[rng.integers(0, n)] = v
    if rng.integers(0, 4) == 0:
        g[: rng.integers(0, n + 1)] = 0.0  # zero blocks keep absmax 0
    return _storage(g, dtype)


def _storage(x32, dtype):
    if dtype == "bfloat16":
        return float32_to_bf16_bits(x32)
    return x32.astype(dtype)


@given(seed=st.integers(0, 2**32 - 1), n=st.sampled_from([1, 2, 255, 256, 257, 4096, 8193, 40000]),
       dtype=st.sampled_from(["float32", "float16", "bfloat16"]), wd=st.sampled_from([0.0, 0.01]),
       gscale=st.sampled_from([1.0, 0.5, 0.0]), specials=st.booleans())
def test_adam8bit_kernel_bit_identical_over_steps(seed, n, dtype, wd, gscale, specials):
    rng = np.random.default_rng(seed)
    p = _storage(rng.standard_normal(n).astype(np.float32), dtype)
    nb = -(-n // 256)
    q1, q2 = dynamic_map(True), dynamic_map(False)
    ours = [p.copy(), np.zeros(n, np.uint8), np.zeros(n, np.uint8), np.zeros(nb, np.float32),
            np.zeros(nb, np.float32)]
    theirs = [a.copy() for a in ours]
    for step in range(1, 5):
        g = _grads(rng, n, dtype, specials)
        s = ref_optim.adam_scalars(1e-3, (0.9, 0.999), 1e-8, wd, step, gscale)
        c_ref = ref_optim.optimizer_update_8bit_blockwise(theirs[0], g, *theirs[1:], q1, q2, s, dtype)
        c_cpu = optim_cpu.update_8bit_flat(ours[0], g, *ours[1:], q1, q2, s, dtype)
        assert c_cpu == c_ref
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def test_adam8bit_nonfinite_rule():
    """A NaN / Inf gradient leaves p unchanged and zeroes that element's moments."""
    n = 512
    p = np.linspace(-1, 1, n).astype(np.float32)
    g = np.full(n, 0.1, np.float32)
    g[[3, 300]] = [np.nan, np.inf]
    st1, st2 = np.zeros(n, np.uint8), np.zeros(n, np.uint8)
    a1, a2 = np.zeros(2, np.float32), np.zeros(2, np.float32)
    s = ref_optim.adam_scalars(1e-2, (0.9, 0.999), 1e-8, 0.0, 1)
    before = p.copy()
    assert optim_cpu.update_8bit_flat(p, g, st1, st2, a1, a2, dynamic_map(True),
                                      dynamic_map(False), s, "float32") == 2
    assert p[3] == before[3] and p[300] == before[300]
    assert (p[[0, 1, 299, 301]] != before[[0, 1, 299, 301]]).all()
    m = dynamic_map(True)[st1] * np.repeat(a1, 256)
    v = dynamic_map(False)[st2] * np.repeat(a2, 256)
    assert m[3] == 0 and v[3] == 0 and m[300] == 0 and v[300] == 0


@pytest.mark.filterwarnings("ignore:AdamW8bit. 1 gradient element")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_adamw8bit_optimizer_cpu_matches_reference(dtype):
    """torch_ops' AdamW8bit on CPU tensors (the Numba kernel) against the same optimizer
    under use_backend("numpy") (the reference): bit-identical p and state over 4 steps, a
    non-finite gradient included."""
    from torch_ops.optim import AdamW8bit
    torch.manual_seed(0)
    p0 = torch.randn(5000).to(dtype)
    grads = [torch.randn(5000).to(dtype) * 0.1 for _ in range(4)]
    grads[2][17] = float("nan")
    results = []
    for backend in (None, "numpy"):
        p = torch.nn.Parameter(p0.clone())
        opt = AdamW8bit([p], lr=1e-2, weight_decay=0.01, min_8bit_size=0)
        for g in grads:
            p.grad = g.clone()
            if backend is None:
                opt.step()
            else:
                with qkernels.use_backend(backend):
                    opt.step()
        st = opt.state[p]
        results.append((p.detach().clone(), st["state1"].clone(), st["state2"].clone(),
                        st["absmax1"].clone(), st["absmax2"].clone()))
    for a, b in zip(*results):
        np.testing.assert_array_equal(_bits(a), _bits(b))


def test_public_update_on_cpu_backend_matches_numpy():
    from qkernels.optim import optimizer_update_8bit_blockwise
    n = 3000
    p_start = np.random.default_rng(3).standard_normal(n).astype(np.float32)
    outs = []
    for backend in ("cpu", "numpy"):
        arrays = [p_start.copy(), np.zeros(n, np.uint8), np.zeros(n, np.uint8),
                  np.zeros(12, np.float32), np.zeros(12, np.float32), np.zeros(1, np.int32)]
        with qkernels.use_backend(backend):
            for step in (1, 2, 3):
                g = np.random.default_rng(step).standard_normal(n).astype(np.float32)
                g[step] = np.nan
                optimizer_update_8bit_blockwise(arrays[0], g, *arrays[1:5], lr=1e-3, step=step,
                                                weight_decay=0.1, nonfinite=arrays[5])
        outs.append(arrays)
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
    assert outs[0][5][0] == 3


# --- the benchmark section -----------------------------------------------------------------

def test_benchmark_cpu_section_small(tmp_path):
    import warnings
    from benchmarks.run import main
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["--ops", "cpu", "--sizes", "small", "--device", "cpu", "--out", str(tmp_path)]) == 0
    text = next(tmp_path.glob("*.md")).read_text()
    assert "## cpu" in text
    for op in ("quantize_blockwise", "dequantize_4bit nf4", "AdamW8bit step", "Linear8bitLt t6 forward",
               "LinearFP4 forward", "model forward int8", "model forward fp32"):
        assert f"| {op} |" in text, op


def test_benchmark_encoder_without_transformers_runs_quantized():
    """The section's own MiniLM-shaped encoder (used when transformers is missing)."""
    from benchmarks.cpu import _batches, _Encoder, _ours
    torch.manual_seed(0)
    model = _Encoder(1).eval()
    ids, mask = _batches(5)[0]
    with torch.no_grad():
        ref_out = model(ids, mask)
        out = _ours(model, "int8")(ids, mask)
    assert out.shape == ref_out.shape == (5, ids.shape[1], 384)
    assert torch.isfinite(out).all()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref_out.flatten(), dim=0)
    assert cos > 0.99
