"""Every codebook built in code equals spec/codebooks.json bit for bit."""
import json
import pathlib

import numpy as np
import pytest

from reference import codebooks

SPEC = json.loads((pathlib.Path(__file__).parent / "data" / "codebooks.json").read_text())


@pytest.mark.parametrize("name", codebooks.CODEBOOK_NAMES)
def test_codebook_bits_match_spec(name):
    ours = codebooks.get_code(name)
    want = np.array([int(h, 16) for h in SPEC[name]["float32_bits_hex"]], dtype=np.uint32)
    assert ours.dtype == np.float32 and ours.shape == (SPEC[name]["n"],)
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
