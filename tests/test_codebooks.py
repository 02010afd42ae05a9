"""Every codebook built in code equals tests/data/codebooks.json bit for bit (docs/FORMATS.md §1)."""
import json
import pathlib

import numpy as np
import pytest

from reference import codebooks

CODEBOOKS = json.loads((pathlib.Path(__file__).parent / "data" / "codebooks.json").read_text())


@pytest.mark.parametrize("name", codebooks.CODEBOOK_NAMES)
def test_codebook_bits_match_spec(name):
    ours = codebooks.get_code(name)
    want = np.array([int(h, 16) for h in CODEBOOKS[name]["float32_bits_hex"]], dtype=np.uint32)
    assert ours.dtype == np.float32 and ours.shape == (CODEBOOKS[name]["n"],)
    np.testing.assert_array_equal(ours.view(np.uint32), want)


def test_codebook_facts():
    signed = codebooks.dynamic_map(True)
    assert signed[127] == 0.0 and signed[255] == 1.0 and signed[0] == np.float32(-0.99296875)
    assert (signed < 0).sum() == 127
    unsigned = codebooks.dynamic_map(False)
    assert unsigned[0] == 0.0 and unsigned[255] == 1.0 and (unsigned >= 0).all()
    lin = codebooks.linear_map()
    assert lin[127] == 0.0 and len(np.unique(lin)) == 256
    fp4 = codebooks.fp4_map()
    assert fp4[8] == 0.0 and np.array_equal(fp4[9:], -fp4[1:8])
    for name in ("dynamic_signed", "dynamic_unsigned", "linear_signed", "fp8_e4m3", "fp8_e5m2", "nf4"):
        c = codebooks.get_code(name)
        assert (np.diff(c) >= 0).all(), name
    with pytest.raises(ValueError, match="unknown codebook"):
        codebooks.get_code("nf3")


def test_codebooks_are_read_only():
    with pytest.raises(ValueError):
        codebooks.dynamic_map()[0] = 1.0


# --- bitsandbytes' constructors (create_*_map, get_4bit_type), NumPy ---------------------------
# tests/test_bnb_functional.py compares them with the installed bitsandbytes bit for bit.

def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


def test_constructors_reproduce_the_maps():
    np.testing.assert_array_equal(_bits(codebooks.create_dynamic_map()), _bits(codebooks.dynamic_map(True)))
    np.testing.assert_array_equal(_bits(codebooks.create_dynamic_map(False)), _bits(codebooks.dynamic_map(False)))
    np.testing.assert_array_equal(_bits(codebooks.create_linear_map()), _bits(codebooks.linear_map()))
    for e, p in ((4, 3), (5, 2)):
        np.testing.assert_array_equal(_bits(codebooks.create_fp8_map(True, e, p)), _bits(codebooks.fp8_map(e, p)))
    normal = codebooks.create_normal_map()
    assert normal.shape == (256,) and (normal[7:248] == 0).all()
    np.testing.assert_array_equal(_bits(np.concatenate([normal[:7], [0], normal[-8:]])),
                                  _bits(codebooks.nf4_map()))
    np.testing.assert_array_equal(codebooks.get_4bit_type("nf4"), codebooks.nf4_map())
    np.testing.assert_array_equal(_bits(codebooks.get_4bit_type("fp4")), _bits(codebooks.fp4_map()))
    c = codebooks.create_dynamic_map()
    c[0] = 5.0                                      # a fresh writable array, not the shared map
    assert codebooks.dynamic_map()[0] != 5.0


@pytest.mark.parametrize("bits", range(2, 9))
def test_few_bit_codes_have_two_to_the_bits_values(bits):
    """bitsandbytes' own property (test_few_bit_quant): 2^bits or 2^bits - 1 distinct values,
    padded with zeros to 256 entries; sorted, except the linear map, whose zeros go in the
    middle (next to linspace's not-quite-zero middle value)."""
    ebits = -(-bits // 2)
    linear = codebooks.create_linear_map(True, bits)
    for code in (linear, codebooks.create_fp8_map(True, ebits, bits - ebits - 1, bits),
                 codebooks.create_dynamic_map(True, bits, bits)):
        assert code.shape == (256,) and code.dtype == np.float32 and code.max() == 1.0
        assert len(np.unique(code)) in (2**bits, 2**bits - 1)
        if code is not linear:
            assert (np.diff(code) >= 0).all()


def test_normal_map_without_extra_value_is_symmetric():
    v = codebooks.create_normal_map(use_extra_value=False)
    nonzero = v[v != 0]
    assert nonzero.size == 14 and np.array_equal(nonzero, -nonzero[::-1])


def test_constructor_arguments_are_checked():
    with pytest.raises(ValueError, match="total_bits"):
        codebooks.create_fp8_map(True, 4, 4)
    with pytest.raises(ValueError, match="2\\*\\*total_bits"):
        codebooks.create_dynamic_map(False, 5, 5)
    with pytest.raises(ValueError, match="total_bits must be in 2..8"):
        codebooks.create_dynamic_map(True, 7, 9)
    with pytest.raises(TypeError, match="total_bits must be an integer"):
        codebooks.create_linear_map(True, 4.0)
    with pytest.raises(ValueError, match="offset"):
        codebooks.create_normal_map(offset=0.3)
    for args in (("nf5",), ("af4", 128)):
        with pytest.raises(ValueError) as info:
            codebooks.get_4bit_type(*args)
        assert isinstance(info.value, NotImplementedError)   # bitsandbytes' exception type
