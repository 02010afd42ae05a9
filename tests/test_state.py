"""QuantState dict formats (docs/FORMATS.md §3), including bitsandbytes' packed record."""
import json

import numpy as np
import pytest

from reference import QuantState, dynamic_map, nf4_map
from reference.blockwise import quantize_blockwise


def _nested_4bit_state():
    absmax = np.abs(np.random.default_rng(0).standard_normal(300)).astype(np.float32)
    qabs, state2 = quantize_blockwise(absmax - absmax.mean(), blocksize=256)
    return QuantState(absmax=qabs, shape=(40, 480), code=nf4_map(), dtype="bfloat16",
                      blocksize=64, quant_type="nf4", offset=float(absmax.mean()), state2=state2)


def test_packed_record_layout():
    s = _nested_4bit_state()
    d = s.as_dict(packed=True)
    assert set(d) == {"absmax", "quant_map", "nested_absmax", "nested_quant_map",
                      "quant_state.bitsandbytes__nf4"}
    record = json.loads(bytes(d["quant_state.bitsandbytes__nf4"].tolist()).decode())
    assert list(record) == ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize",
                            "nested_dtype", "nested_offset"]
    assert record["shape"] == [40, 480] and record["dtype"] == "bfloat16"
    assert record["nested_blocksize"] == 256 and record["nested_dtype"] == "float32"
    # bitsandbytes writes json.dumps with default separators
    assert d["quant_state.bitsandbytes__nf4"].tobytes() == json.dumps(record).encode()


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("prefix", ["", "weight."])
def test_round_trip(packed, prefix):
    s = _nested_4bit_state()
    d = {prefix + k: v for k, v in s.as_dict(packed=packed).items()}
    r = QuantState.from_dict(d)
    assert (r.shape, r.dtype, r.blocksize, r.quant_type) == ((40, 480), "bfloat16", 64, "nf4")
    assert r.offset == pytest.approx(s.offset, rel=0, abs=0)
    np.testing.assert_array_equal(r.absmax, s.absmax)
    np.testing.assert_array_equal(r.state2.absmax, s.state2.absmax)
    np.testing.assert_array_equal(r.state2.code, dynamic_map())
    assert r.state2.blocksize == 256


def test_8bit_state_packed_is_unpacked():
    s = QuantState(absmax=np.ones(3, np.float32), code=dynamic_map(), blocksize=256)
    d = s.as_dict(packed=True)
    assert d["quant_type"] is None and d["shape"] is None
    assert QuantState.from_dict(d).blocksize == 256


def test_from_dict_errors():
    d = _nested_4bit_state().as_dict(packed=True)
    with pytest.raises(ValueError, match="unknown QuantState keys"):
        QuantState.from_dict({**d, "bogus": 1})
    two = {**d, "x.quant_state.bitsandbytes__fp4": d["quant_state.bitsandbytes__nf4"]}
    with pytest.raises(ValueError, match="exactly one"):
        QuantState.from_dict(two)
    bad = dict(d)
    bad["quant_state.bitsandbytes__nf5"] = bad.pop("quant_state.bitsandbytes__nf4")
    with pytest.raises(ValueError, match="__nf4"):
        QuantState.from_dict(bad)
    with pytest.raises(ValueError, match="found neither"):
        QuantState.from_dict({"absmax": d["absmax"]})


@pytest.mark.parametrize("key", ["absmax", "quant_map", "nested_absmax", "nested_quant_map"])
@pytest.mark.parametrize("packed", [False, True])
def test_from_dict_names_a_list_where_an_array_belongs(key, packed):
    """A Python list as an array value (a hand-built state_dict): a TypeError naming the key,
    not an AttributeError later in dequantization."""
    d = {"weight." + k: v for k, v in _nested_4bit_state().as_dict(packed=packed).items()}
    d["weight." + key] = np.asarray(d["weight." + key]).tolist()
    with pytest.raises(TypeError, match=rf"'weight.{key}' must be an array .*; got list"):
        QuantState.from_dict(d)


def test_from_dict_names_bad_values():
    d = _nested_4bit_state().as_dict(packed=True)
    packed_key = "quant_state.bitsandbytes__nf4"
    with pytest.raises(TypeError, match=rf"'{packed_key}' must be an array .*; got list"):
        QuantState.from_dict({**d, packed_key: d[packed_key].tolist()})
    with pytest.raises(ValueError, match=rf"'{packed_key}' must hold the UTF-8 JSON"):
        QuantState.from_dict({**d, packed_key: np.frombuffer(b"\xff{", np.uint8)})
    with pytest.raises(ValueError, match=rf"'{packed_key}' must hold the UTF-8 JSON.*object"):
        QuantState.from_dict({**d, packed_key: np.frombuffer(b"[1, 2]", np.uint8)})
    plain = _nested_4bit_state().as_dict(packed=False)
    bad_values = {
        "blocksize": ("64", r"'blocksize' must be an integer; got str"),
        "nested_blocksize": (2.5, r"'nested_blocksize' must be an integer; got float"),
        "shape": ("40x480", r"'shape' must be a list or tuple of integers or None; got str"),
        "nested_offset": ([0.5], r"'nested_offset' must be a number; got list"),
        "dtype": (["bfloat16"], r"'dtype' must be a dtype name .*; got list"),
        "quant_type": (4, r"'quant_type' must be 'nf4', 'fp4' or None; got 4"),
    }
    for key, (value, pattern) in bad_values.items():
        with pytest.raises(TypeError, match=pattern):
            QuantState.from_dict({**plain, key: value})
    with pytest.raises(TypeError, match=r"qs_dict must be a dict .*; got list"):
        QuantState.from_dict(list(plain.items()))
    with pytest.raises(TypeError, match=r"qs_dict keys must be str; got int"):
        QuantState.from_dict({**plain, 0: 1})
    partial = {k: v for k, v in plain.items() if k != "nested_quant_map"}
    with pytest.raises(ValueError, match=r"nested.*missing \['nested_quant_map'\]"):
        QuantState.from_dict(partial)


def test_from_dict_accepts_torch_values_and_tensor_scalars():
    torch = pytest.importorskip("torch")
    s = _nested_4bit_state()
    d = {k: torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v
         for k, v in s.as_dict(packed=False).items()}
    d["blocksize"], d["nested_offset"] = torch.tensor(64), torch.tensor(s.offset)
    d["shape"], d["dtype"] = torch.Size([40, 480]), torch.bfloat16
    r = QuantState.from_dict(d)
    # a state over torch tensors reads its dtype back as a torch.dtype (as bitsandbytes'
    # QuantState, whose users pass it to torch); the stored field is the name
    assert (r.blocksize, r.shape, r.dtype) == (64, (40, 480), torch.bfloat16)
    assert vars(r)["dtype"] == "bfloat16"
    assert r.offset == pytest.approx(s.offset, rel=1e-7)
    assert isinstance(r.absmax, torch.Tensor)


# --- bitsandbytes' QuantState surface (NumPy; torch and bitsandbytes: test_bnb_functional.py) --

def test_positional_order_is_bitsandbytes():
    s = QuantState(np.ones(2, np.float32), (2, 64), nf4_map(), 64, "nf4", "float16")
    assert (s.shape, s.blocksize, s.quant_type, s.dtype) == ((2, 64), 64, "nf4", "float16")


def test_equality_legacy_indexing_and_packed_attribute():
    s = _nested_4bit_state()
    same = QuantState.from_dict(s.as_dict(packed=True))
    assert s == same and not (s != same)
    assert s != QuantState(**{**vars(s), "offset": s.offset + 1})
    assert s != QuantState(**{**vars(s), "state2": None, "offset": None})
    assert s.__eq__(3) is NotImplemented
    assert [s[i] for i in range(4)] == [s.absmax, (40, 480), "bfloat16", 64]
    assert s[4] == [s.offset, s.state2] and s[5] == "nf4" and len(list(s)) == 6
    np.testing.assert_array_equal(s.bitsandbytes__nf4, s.as_dict(packed=True)["quant_state.bitsandbytes__nf4"])
    with pytest.raises(AttributeError):
        s.bitsandbytes__fp4


def test_as_dict_copies_codebooks():
    s = _nested_4bit_state()
    d = s.as_dict(packed=True)
    assert not np.shares_memory(d["quant_map"], s.code)
    assert not np.shares_memory(d["nested_quant_map"], s.state2.code)
    assert np.shares_memory(d["absmax"], s.absmax)


def test_from_dict_device_and_to_with_numpy():
    s = _nested_4bit_state()
    d = s.as_dict(packed=False)
    r = QuantState.from_dict(d, "cpu")
    assert r == s and isinstance(r.absmax, np.ndarray)
    assert r.to("cpu") is r
    assert set(d) == set(s.as_dict(packed=False))       # the caller's dict is not consumed


def test_duck_typed_states_are_read_through_their_attributes():
    """bitsandbytes' QuantState (here a stand-in with its attributes and as_dict) converts."""
    from reference.state import as_quant_state

    class Theirs:
        def __init__(self, s):
            self.__dict__.update({k: getattr(s, k) for k in ("absmax", "shape", "code", "blocksize",
                                                             "quant_type", "dtype", "offset")})
            self.state2 = None if s.state2 is None else Theirs(s.state2)

        def as_dict(self, packed=False):
            raise AssertionError("read through the attributes")

    s = _nested_4bit_state()
    ours = as_quant_state(Theirs(s))
    assert isinstance(ours, QuantState) and ours == s and ours.absmax is s.absmax
    assert s == Theirs(s)
    with pytest.raises(TypeError, match="state must be a QuantState; got dict"):
        as_quant_state({"absmax": s.absmax})
