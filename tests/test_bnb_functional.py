"""bitsandbytes' functional API on qkernels (issue 23): names, signatures, ``out=``, QuantState
in both directions and the exceptions for bad input, on CPU torch tensors.

Each check runs against the installed bitsandbytes where it imports (the ``F`` fixture) and
against our reference otherwise; the NumPy forms of the same calls are tested here too.
"""
from __future__ import annotations

import copy
import inspect
import pickle

import numpy as np
import pytest

import qkernels
from reference import codebooks
from reference.state import QuantState

torch = pytest.importorskip("torch")


@pytest.fixture
def F():
    """bitsandbytes.functional with torch.compile off (its CPU fallbacks are compiled: tens of
    seconds per new shape on 2 cores, and nothing changes)."""
    functional = pytest.importorskip("bitsandbytes.functional")
    with torch._dynamo.config.patch(disable=True):
        yield functional


def _randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


# --- names and signatures --------------------------------------------------------------------

FUNCTIONS = ["quantize_blockwise", "dequantize_blockwise", "quantize_4bit", "dequantize_4bit",
             "quantize_nf4", "quantize_fp4", "dequantize_nf4", "dequantize_fp4", "gemv_4bit",
             "int8_vectorwise_quant", "int8_vectorwise_dequant", "int8_linear_matmul",
             "int8_mm_dequant", "int8_double_quant", "create_dynamic_map", "create_linear_map",
             "create_fp8_map", "create_normal_map", "get_4bit_type"]


def _default(value):
    """A default made comparable: dtypes by name (ours are names, bitsandbytes' torch dtypes)."""
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return value


@pytest.mark.parametrize("name", FUNCTIONS)
def test_signature_is_bitsandbytes(F, name):
    """The positional parameters: bitsandbytes' names, order and defaults. Ours may add
    keyword-only ones (state=, out_dtype=)."""
    theirs = inspect.signature(getattr(F, name)).parameters
    ours = inspect.signature(getattr(qkernels, name)).parameters
    positional = [p for p in ours.values() if p.kind is not p.KEYWORD_ONLY]
    assert [p.name for p in positional] == list(theirs)
    for p in positional:
        assert _default(p.default) == _default(theirs[p.name].default), p.name


def test_quant_state_signatures(F):
    theirs = inspect.signature(F.QuantState).parameters
    assert list(inspect.signature(QuantState).parameters) == list(theirs)
    assert list(inspect.signature(QuantState.from_dict).parameters) == \
        list(inspect.signature(F.QuantState.from_dict).parameters)
    assert qkernels.QuantState is QuantState


# --- codebooks ---------------------------------------------------------------------------------

CODEBOOK_CALLS = [
    ("create_dynamic_map", ()), ("create_dynamic_map", (False,)), ("create_dynamic_map", (True, 4, 4)),
    ("create_dynamic_map", (False, 5, 6)), ("create_dynamic_map", (True, 8, 8)),
    ("create_linear_map", ()), ("create_linear_map", (False,)), ("create_linear_map", (True, 4)),
    ("create_linear_map", (True, 8, False)),
    ("create_fp8_map", ()), ("create_fp8_map", (True, 4, 3)), ("create_fp8_map", (True, 2, 1, 4)),
    ("create_fp8_map", (False, 4, 4)), ("create_fp8_map", (True, 3, 0, 4)),
]


@pytest.mark.parametrize("name,args", CODEBOOK_CALLS)
def test_codebook_constructors_equal_bitsandbytes(F, name, args):
    ours, theirs = getattr(qkernels, name)(*args), getattr(F, name)(*args)
    assert isinstance(ours, torch.Tensor) and ours.dtype == torch.float32 and ours.shape == (256,)
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))  # bit for bit


def test_codebook_constructors_are_the_reference_maps():
    """Without bitsandbytes: the defaults are the maps the ops use (tests/test_codebooks.py
    checks those against spec/codebooks.json)."""
    assert torch.equal(qkernels.create_dynamic_map(), torch.from_numpy(codebooks.dynamic_map(True)))
    assert torch.equal(qkernels.create_dynamic_map(False), torch.from_numpy(codebooks.dynamic_map(False)))
    assert torch.equal(qkernels.create_linear_map(), torch.from_numpy(codebooks.linear_map()))
    assert torch.equal(qkernels.create_fp8_map(True, 4, 3), torch.from_numpy(codebooks.fp8_map(4, 3)))
    normal = qkernels.create_normal_map()
    nf4 = torch.cat([normal[:7], torch.zeros(1), normal[-8:]])
    assert torch.equal(nf4, torch.from_numpy(codebooks.nf4_map()))


@pytest.mark.parametrize("typename", ["nf4", "fp4", "af4"])
def test_get_4bit_type(F, typename):
    ours = qkernels.get_4bit_type(typename, device="cpu")
    theirs = F.get_4bit_type(typename, device="cpu")
    assert ours.dtype == torch.float32 and ours.shape == (16,)
    assert torch.equal(ours, theirs)
    assert qkernels.get_4bit_type(typename).device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_get_4bit_type_rejects_what_bitsandbytes_rejects(F):
    for args in [("nf5",), ("af4", None, 128)]:
        with pytest.raises(NotImplementedError):
            F.get_4bit_type(*args[:1], device="cpu", blocksize=args[2] if len(args) > 2 else 64)
        with pytest.raises((NotImplementedError, ValueError), match="af4|typename"):
            qkernels.get_4bit_type(*args[:1], device="cpu", blocksize=args[2] if len(args) > 2 else 64)
    # int4 (a torch type error inside bitsandbytes 0.50.2) is the float code 7..0, -0..-7 over 7
    assert torch.equal(qkernels.get_4bit_type("int4", device="cpu") * 7,
                       torch.tensor([7, 6, 5, 4, 3, 2, 1, 0, 0, -1, -2, -3, -4, -5, -6, -7.0]))


# --- QuantState ------------------------------------------------------------------------------

def _nested_4bit():
    return qkernels.quantize_4bit(_randn(64, 96, dtype=torch.bfloat16), blocksize=64,
                                  compress_statistics=True, quant_type="nf4")


def test_quant_state_reads_like_bitsandbytes():
    packed, st = _nested_4bit()
    assert st.dtype is torch.bfloat16 and st.state2.dtype is torch.float32
    assert st.shape == (64, 96) and st.blocksize == 64 and st.quant_type == "nf4" and st.nested
    assert vars(st)["dtype"] == "bfloat16"      # stored by name; vars() rebuilds the state
    assert QuantState(**vars(st)).dtype is torch.bfloat16
    assert st[0] is st.absmax and st[1] == (64, 96) and st[2] is torch.bfloat16 and st[3] == 64
    assert st[4][0] == st.offset and st[4][1] is st.state2 and st[5] == "nf4"
    assert len(list(st)) == 6
    packed_key = st.as_dict(packed=True)["quant_state.bitsandbytes__nf4"]
    assert torch.equal(getattr(st, "bitsandbytes__nf4"), packed_key)
    with pytest.raises(AttributeError, match="nonexistent"):
        st.nonexistent
    numpy_state = qkernels.quantize_4bit(np.ones(64, np.float16))[1]
    assert numpy_state.dtype == "float16"       # NumPy states keep the name


def test_quant_state_equality_copy_and_pickle():
    packed, st = _nested_4bit()
    assert st == copy.deepcopy(st) and st == pickle.loads(pickle.dumps(st))
    other = copy.deepcopy(st)
    other.state2.absmax = other.state2.absmax + 1
    assert st != other
    assert st != QuantState(**{**vars(st), "blocksize": 128})
    assert st != "not a state"
    assert {st: 1}[st] == 1                        # still hashable (by identity)


def test_as_dict_codebooks_are_not_shared():
    """Many states share one codebook tensor; a state_dict must not (safetensors refuses)."""
    _, a = qkernels.quantize_4bit(_randn(8, 64), quant_type="nf4", compress_statistics=True)
    _, b = qkernels.quantize_4bit(_randn(8, 64, seed=1), quant_type="nf4", compress_statistics=True)
    da, db = a.as_dict(packed=True), b.as_dict(packed=True)
    assert da["quant_map"].data_ptr() != db["quant_map"].data_ptr()
    assert da["nested_quant_map"].data_ptr() != db["nested_quant_map"].data_ptr()
    assert torch.equal(da["quant_map"], a.code)


@pytest.mark.parametrize("packed", [False, True])
def test_from_dict_device_positional(packed):
    _, st = _nested_4bit()
    d = st.as_dict(packed=packed)
    before = dict(d)
    back = QuantState.from_dict(d, torch.device("cpu"))
    assert back == st and back.absmax.device.type == "cpu"
    assert QuantState.from_dict(qs_dict=d, device="cpu") == st
    assert d.keys() == before.keys()                 # the caller's dict is left alone


def test_to_moves_in_place_and_numpy_stays_on_host():
    _, st = _nested_4bit()
    assert st.to("cpu") is st and st.absmax.device.type == "cpu"
    _, ns = qkernels.quantize_4bit(np.ones(64, np.float32), compress_statistics=True)
    ns.to("cpu")
    assert isinstance(ns.absmax, np.ndarray)
    moved = qkernels.quantize_4bit(np.ones(64, np.float32))[1].to(torch.device("cpu"))
    assert isinstance(moved.absmax, np.ndarray)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bitsandbytes_quant_state_works_here(F, quant_type, nested):
    """A bitsandbytes QuantState where we take ours (it was 'state must be a QuantState; got
    QuantState'), and ours passes bitsandbytes' own checks."""
    x = _randn(32, 64, dtype=torch.float16)
    q, theirs = F.quantize_4bit(x, blocksize=64, quant_type=quant_type, compress_statistics=nested)
    assert torch.equal(qkernels.dequantize_4bit(q, theirs), F.dequantize_4bit(q, theirs))
    assert torch.equal(qkernels.dequantize_4bit(q, quant_state=theirs), F.dequantize_4bit(q, theirs))
    assert QuantState.from_dict(theirs.as_dict(packed=True)) == theirs
    packed, ours = qkernels.quantize_4bit(x, blocksize=64, quant_type=quant_type,
                                          compress_statistics=nested)
    assert torch.equal(F.dequantize_4bit(packed, ours), qkernels.dequantize_4bit(packed, ours))
    assert F.QuantState.from_dict(ours.as_dict(packed=True), torch.device("cpu")).dtype == torch.float16


@pytest.mark.parametrize("nested", [False, True])
def test_bitsandbytes_blockwise_state_works_here(F, nested):
    x = _randn(300, 40)
    c, theirs = F.quantize_blockwise(x, blocksize=256, nested=nested)
    assert torch.equal(qkernels.dequantize_blockwise(c, theirs), F.dequantize_blockwise(c, theirs))
    codes, ours = qkernels.quantize_blockwise(x, blocksize=256, nested=nested)
    assert torch.equal(F.dequantize_blockwise(codes, ours), qkernels.dequantize_blockwise(codes, ours))
    roundtrip = F.QuantState.from_dict(ours.as_dict(), device=torch.device("cpu"))
    assert torch.equal(qkernels.dequantize_blockwise(codes, roundtrip), qkernels.dequantize_blockwise(codes, ours))


# --- bitsandbytes' keywords and out= -------------------------------------------------------------

def test_blockwise_out_and_absmax_are_written():
    x = _randn(5, 300)
    want_codes, want = qkernels.quantize_blockwise(x, blocksize=64)
    out, absmax = torch.empty(5, 300, dtype=torch.uint8), torch.empty(24)
    codes, st = qkernels.quantize_blockwise(x, None, absmax, out, 64)
    assert codes is out and st.absmax is absmax
    assert torch.equal(out, want_codes) and torch.equal(absmax, want.absmax)
    res = torch.empty(5, 300)
    assert qkernels.dequantize_blockwise(codes, st, out=res) is res
    assert torch.equal(res, qkernels.dequantize_blockwise(codes, state=st))
    # bitsandbytes' stateless form: absmax, code, blocksize (float32 result)
    got = qkernels.dequantize_blockwise(codes, absmax=absmax, code=qkernels.create_dynamic_map(),
                                        blocksize=64)
    assert got.dtype == torch.float32 and torch.equal(got, res)
    assert torch.equal(qkernels.dequantize_blockwise(codes, None, absmax, blocksize=64), res)


def test_blockwise_numpy_out():
    x = np.random.default_rng(0).standard_normal(500).astype(np.float32)
    out = np.empty(500, np.uint8)
    codes, st = qkernels.quantize_blockwise(x, out=out, blocksize=128)
    assert codes is out
    res = np.empty(500, np.float16)
    assert qkernels.dequantize_blockwise(codes, st, out=res) is res     # out's dtype is the result's
    np.testing.assert_array_equal(res, qkernels.dequantize_blockwise(codes, st, out_dtype="float16"))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_out_and_stateless_dequantize(F, quant_type):
    x = _randn(16, 64, dtype=torch.bfloat16)
    want_packed, want = qkernels.quantize_4bit(x, quant_type=quant_type)
    out, absmax = torch.empty_like(want_packed), torch.empty(16)
    packed, st = qkernels.quantize_4bit(x, absmax, out, 64, False, quant_type)
    assert packed is out and st.absmax is absmax and torch.equal(out, want_packed)
    res = torch.empty(16, 64, dtype=torch.bfloat16)
    assert qkernels.dequantize_4bit(packed, st, out=res) is res
    assert torch.equal(res, qkernels.dequantize_4bit(packed, st))
    # bitsandbytes' stateless form: absmax and out, blocksize and quant_type
    res2 = torch.empty(16, 64, dtype=torch.bfloat16)
    qkernels.dequantize_4bit(packed, None, absmax, res2, 64, quant_type)
    assert torch.equal(res2, res)
    assert torch.equal(F.dequantize_4bit(packed, st), res)  # (its stateless .out op has no CPU kernel)
    short = getattr(qkernels, f"dequantize_{quant_type}")
    assert torch.equal(short(packed, st), res)
    assert torch.equal(getattr(qkernels, f"quantize_{quant_type}")(x)[0], want_packed)


def test_earlier_positional_forms_still_work():
    x = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
    a, sa = qkernels.quantize_4bit(x, 32, "nf4", True, "float32")
    b, sb = qkernels.quantize_4bit(x, blocksize=32, quant_type="nf4", compress_statistics=True,
                                   quant_storage="float32")
    np.testing.assert_array_equal(a, b)
    assert sa == sb and sa.blocksize == 32 and sa.nested and a.dtype == np.float32
    c, sc = qkernels.quantize_nf4(x, 32, True)
    assert sc == sb
    codes, st = qkernels.quantize_blockwise(x, None, 128)
    assert st.blocksize == 128
    A = np.random.default_rng(2).integers(-100, 100, (4, 8)).astype(np.int32)
    r, c_ = np.ones(4, np.float32), np.ones(8, np.float32)
    bias = np.arange(8, dtype=np.float32)
    np.testing.assert_array_equal(qkernels.int8_mm_dequant(A, r, c_, bias),
                                  qkernels.int8_mm_dequant(A, r, c_, bias=bias))
    t = torch.from_numpy(x).half()
    assert torch.equal(qkernels.int8_double_quant(t, 1.0)[4], qkernels.int8_double_quant(t, threshold=1.0)[4])


def test_int8_out_and_bitsandbytes_agreement(F):
    A, B = _randn(16, 64, dtype=torch.float16), _randn(32, 64, dtype=torch.float16, seed=1)
    CA, SA, _ = qkernels.int8_vectorwise_quant(A)
    tCA, tSA, _ = F.int8_vectorwise_quant(A)
    assert torch.equal(SA, tSA) and (CA == tCA).float().mean() >= 0.9999
    CB, SB, _ = qkernels.int8_vectorwise_quant(B)
    out = torch.empty(16, 32, dtype=torch.int32)
    C = qkernels.int8_linear_matmul(CA, CB, out)
    assert C is out and torch.equal(C, F.int8_linear_matmul(CA, CB))
    bias = _randn(32, dtype=torch.float16, seed=2)
    theirs = F.int8_mm_dequant(C, SA, SB, bias=bias)
    ours = qkernels.int8_mm_dequant(C, SA, SB, bias=bias)
    assert ours.dtype == theirs.dtype == torch.float16
    # bitsandbytes' CPU constant is 1.8e-5 relative off (docs/FORMATS.md §5.5): within 1 fp16 ulp
    ulp = torch.finfo(torch.float16).eps * theirs.float().abs().clamp(min=2**-14)
    assert ((ours.float() - theirs.float()).abs() <= ulp).all()
    res = torch.empty(16, 32)
    assert qkernels.int8_mm_dequant(C, SA, SB, res, bias) is res   # computed in out's dtype
    assert torch.equal(res.half(), ours) or ((res - ours.float()).abs() <= ulp).all()
    # (M, 1) statistics, as bitsandbytes' own tests pass them
    assert torch.equal(qkernels.int8_mm_dequant(C, SA[:, None], SB[:, None]), qkernels.int8_mm_dequant(C, SA, SB))


def test_gemv_4bit_matches_matmul_4bit(F):
    A, W = _randn(1, 128, dtype=torch.float16), _randn(96, 128, dtype=torch.float16, seed=1)
    for storage in (torch.uint8, torch.float32):
        qB, st = qkernels.quantize_4bit(W, quant_type="nf4", quant_storage=storage)
        got = qkernels.gemv_4bit(A, qB.t(), state=st)
        assert got.shape == (1, 96) and got.dtype == torch.float16
        assert torch.equal(got, qkernels.fourbit.matmul_4bit(A, qB, st))
        out = torch.empty(1, 96, dtype=torch.float16)
        assert qkernels.gemv_4bit(A, qB.t(), out, state=st) is out and torch.equal(out, got)
        # bitsandbytes dequantizes the same bytes and state as we do (its own CPU gemv_4bit
        # expects weights repacked for its CPU kernel and is no oracle here); the product of
        # the float32 weight, accumulated in float32, is rounded once to fp16: within an ulp
        assert torch.equal(F.dequantize_4bit(qB, st), qkernels.dequantize_4bit(qB, st))
        exact = A.double() @ qkernels.dequantize_4bit(qB, st, out_dtype="float32").double().t()
        torch.testing.assert_close(got.double(), exact, rtol=1e-3, atol=1e-4)


# --- bad input: the exception bitsandbytes raises, the argument named --------------------------

def _bad_calls(x, q4, s4, c8, s8, i32):
    return [
        ("quantize_blockwise", (x.double(),), {}, "float64"),
        ("quantize_blockwise", (x,), {"blocksize": 0}, "blocksize"),
        ("dequantize_blockwise", (c8.to(torch.int8), s8), {}, "uint8"),
        ("dequantize_blockwise", (c8,), {}, "absmax"),
        ("quantize_4bit", (x.double(),), {}, "float64"),
        ("quantize_4bit", (x,), {"blocksize": 100}, "blocksize"),
        ("quantize_4bit", (x,), {"quant_type": "int4"}, "quant_type"),
        ("dequantize_4bit", (q4,), {}, "absmax"),
        ("int8_double_quant", (x.half(),), {"col_stats": torch.zeros(3)}, "col_stats"),
        ("int8_double_quant", (x.half(),), {"out_row": torch.zeros(3)}, "out_row"),
        ("gemv_4bit", (x[:1], q4.t()), {}, "state"),
        ("int8_mm_dequant", (i32.float(), torch.ones(8), torch.ones(8)), {}, "int32"),
        ("int8_mm_dequant", (i32, torch.ones(8).half(), torch.ones(8)), {}, "row_stats"),
    ]


def test_bad_input_raises_what_bitsandbytes_raises(F):
    x = _randn(8, 64)
    q4, s4 = F.quantize_4bit(x)
    c8, s8 = F.quantize_blockwise(x, blocksize=64)
    i32 = torch.ones(8, 8, dtype=torch.int32)
    for name, args, kwargs, named in _bad_calls(x, q4, s4, c8, s8, i32):
        with pytest.raises(Exception) as theirs:
            getattr(F, name)(*args, **kwargs)
        with pytest.raises(theirs.type, match=named):
            getattr(qkernels, name)(*args, **kwargs)


def test_bad_dtype_is_both_type_and_value_error():
    """Our TypeErrors for a wrong dtype stay TypeErrors, and are ValueErrors as in bitsandbytes."""
    x = np.ones(64, np.float64)
    for call in (lambda: qkernels.quantize_blockwise(x), lambda: qkernels.quantize_4bit(x),
                 lambda: qkernels.int8_vectorwise_quant(x)):
        with pytest.raises(TypeError, match="float64") as info:
            call()
        assert isinstance(info.value, ValueError)


# --- CUDA: the same calls on GPU tensors -------------------------------------------------------

@pytest.mark.gpu
def test_out_and_states_on_cuda():
    x = _randn(33, 128, dtype=torch.bfloat16).cuda()
    codes, st = qkernels.quantize_blockwise(x, blocksize=64, out=torch.empty(33, 128, dtype=torch.uint8,
                                                                          device="cuda"))
    res = torch.empty(33, 128, dtype=torch.bfloat16, device="cuda")
    assert qkernels.dequantize_blockwise(codes, st, out=res) is res
    assert torch.equal(res, qkernels.dequantize_blockwise(codes, st))
    got = qkernels.dequantize_blockwise(codes, absmax=st.absmax, blocksize=64)   # default code on cuda
    assert got.dtype == torch.float32 and torch.equal(got.bfloat16(), res)
    packed, s4 = qkernels.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    assert s4.dtype is torch.bfloat16
    back = QuantState.from_dict(s4.to("cpu").as_dict(packed=True), "cuda")
    assert back.absmax.is_cuda and back.state2.code.is_cuda
    s4.to("cuda")
    assert back == s4
    assert torch.equal(qkernels.dequantize_4bit(packed, back), qkernels.dequantize_4bit(packed, s4))
    C = torch.empty(33, 64, dtype=torch.int32, device="cuda")
    CA, SA, _ = qkernels.int8_vectorwise_quant(x.half())
    CB, SB, _ = qkernels.int8_vectorwise_quant(x[:32].half().repeat(2, 1))
    assert qkernels.int8_linear_matmul(CA, CB, C) is C
    out = torch.empty(33, 64, dtype=torch.float16, device="cuda")
    assert qkernels.int8_mm_dequant(C, SA, SB, out) is out
    assert torch.equal(out, qkernels.int8_mm_dequant(C, SA, SB))


@pytest.mark.gpu
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_gemv_4bit_on_cuda(storage):
    A, W = _randn(1, 256, dtype=torch.float16).cuda(), _randn(192, 256, dtype=torch.float16, seed=1).cuda()
    qB, st = qkernels.quantize_4bit(W, quant_type="nf4", compress_statistics=True, quant_storage=storage)
    got = qkernels.gemv_4bit(A, qB.t(), state=st)
    assert got.shape == (1, 192) and torch.equal(got, qkernels.fourbit.matmul_4bit(A, qB, st))
    exact = A.double() @ qkernels.dequantize_4bit(qB, st, out_dtype="float32").double().t()
    torch.testing.assert_close(got.double(), exact, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("nested", [False, True])
def test_bitsandbytes_states_on_cuda(F, nested):
    x = _randn(64, 128, dtype=torch.float16).cuda()
    q, theirs = F.quantize_4bit(x, quant_type="nf4", compress_statistics=nested)
    assert torch.equal(qkernels.dequantize_4bit(q, theirs), F.dequantize_4bit(q, theirs))
    packed, ours = qkernels.quantize_4bit(x, quant_type="nf4", compress_statistics=nested)
    assert torch.equal(F.dequantize_4bit(packed, ours), qkernels.dequantize_4bit(packed, ours))
    c, s8 = F.quantize_blockwise(x, blocksize=256, nested=nested)
    assert torch.equal(qkernels.dequantize_blockwise(c, s8), F.dequantize_blockwise(c, s8))
    codes, o8 = qkernels.quantize_blockwise(x, blocksize=256, nested=nested)
    assert torch.equal(F.dequantize_blockwise(codes, o8), qkernels.dequantize_blockwise(codes, o8))
