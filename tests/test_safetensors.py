"""safetensors round trips of every quantized layer type (issue 24 item 3).

``safetensors.torch.save_file(model.state_dict())`` refuses tensors that share storage; a
state_dict shares storage only where two keys really are one tensor. For each layer type
(Linear4bit NF4/FP4 with and without nested statistics and with a float quant_storage,
Linear8bitLt with and without outliers and with float weights, the SwitchBack variants, also
prepared for evaluation, LinearFP8Mixed / LinearFP8Global), two layers in one model: the file
saves, ``load_file`` gives back every tensor exactly (dtype, shape, bits), and a freshly built
model loading it computes bit-identical outputs.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torch_ops

st = pytest.importorskip("safetensors.torch")

IN, OUT = 128, 64

LAYERS = {
    "nf4_nested": lambda: torch_ops.LinearNF4(IN, OUT, compress_statistics=True),
    "nf4_plain": lambda: torch_ops.LinearNF4(IN, OUT, compress_statistics=False),
    "fp4_nested": lambda: torch_ops.LinearFP4(IN, OUT, compress_statistics=True),
    "fp4_plain_bf16_storage": lambda: torch_ops.LinearFP4(IN, OUT, compress_statistics=False,
                                                          quant_storage=torch.bfloat16),
    "int8": lambda: torch_ops.Linear8bitLt(IN, OUT, has_fp16_weights=False),
    "int8_threshold": lambda: torch_ops.Linear8bitLt(IN, OUT, has_fp16_weights=False, threshold=6.0),
    "int8_fp16_weights": lambda: torch_ops.Linear8bitLt(IN, OUT, has_fp16_weights=True),
    "switchback_global": lambda: torch_ops.SwitchBackLinearGlobal(IN, OUT),
    "switchback_vectorwise": lambda: torch_ops.SwitchBackLinearVectorwise(IN, OUT),
    "switchback_memefficient": lambda: torch_ops.SwitchBackLinearGlobalMemEfficient(IN, OUT),
    "fp8_mixed": lambda: torch_ops.LinearFP8Mixed(IN, OUT),
    "fp8_global": lambda: torch_ops.LinearFP8Global(IN, OUT),
}


def _model(kind: str, seed: int, prepared: bool = False) -> nn.Module:
    """Two layers of one kind (IN -> OUT -> OUT... as IN -> OUT twice, side by side), on CPU,
    quantized; ``prepared``: SwitchBack's prepare_for_eval."""
    torch.manual_seed(seed)
    model = nn.ModuleList([LAYERS[kind](), LAYERS[kind]()]).to("cpu")
    if prepared:
        model.eval()
        for layer in model:
            layer.prepare_for_eval()
    return model


def _run(model: nn.Module, x: torch.Tensor) -> list:
    with torch.no_grad():
        return [layer(x) for layer in model]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (packed 4-bit payloads viewed as bfloat16 hold NaN patterns)."""
    return t.reshape(-1).view(torch.uint8)


def _assert_no_shared_storage(sd: dict) -> None:
    """Two keys share storage only if they are the same tensor (same data, shape, strides)."""
    seen = {}
    for key, t in sd.items():
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            other = sd[seen[ptr]]
            same = (other.data_ptr() == t.data_ptr() and other.shape == t.shape
                    and other.stride() == t.stride() and other.dtype == t.dtype)
            assert same, f"{key} shares storage with {seen[ptr]}"
        seen.setdefault(ptr, key)


CASES = [(k, False) for k in LAYERS] + [(k, True) for k in LAYERS if k.startswith("switchback")]


@pytest.mark.parametrize("kind,prepared", CASES, ids=[f"{k}{'-prepared' if p else ''}" for k, p in CASES])
def test_save_load_round_trip_is_exact(kind, prepared, tmp_path):
    model = _model(kind, seed=0, prepared=prepared)
    x = torch.randn(5, IN, dtype=torch.float16 if kind.startswith("int8") else torch.float32)
    expected = _run(model, x)
    sd = model.state_dict()
    _assert_no_shared_storage(sd)
    path = tmp_path / "model.safetensors"
    st.save_file(sd, path)  # raises on shared or non-contiguous tensors
    loaded = st.load_file(path)
    assert loaded.keys() == {k for k, v in sd.items() if isinstance(v, torch.Tensor)} == sd.keys()
    for key, t in sd.items():
        got = loaded[key]
        assert got.dtype == t.dtype and got.shape == t.shape, key
        assert torch.equal(_bits(got), _bits(t)), key

    fresh = _model(kind, seed=1, prepared=prepared)  # other weights, same structure
    assert not all(torch.equal(a, b) for a, b in zip(_run(fresh, x), expected))
    fresh.load_state_dict(loaded, strict=True)
    for got, want in zip(_run(fresh, x), expected):
        assert torch.equal(got, want)
    # and what the reloaded model saves is the same file content
    again = fresh.state_dict()
    _assert_no_shared_storage(again)
    assert all(torch.equal(_bits(again[k]), _bits(sd[k])) for k in sd)


def test_mixed_model_saves_in_one_file(tmp_path):
    """Every kind in one model (the 4-bit layers' codebooks used to share one storage)."""
    torch.manual_seed(0)
    model = nn.ModuleDict({k: make() for k, make in LAYERS.items()}).to("cpu")
    sd = model.state_dict()
    _assert_no_shared_storage(sd)
    st.save_file(sd, tmp_path / "all.safetensors")
    loaded = st.load_file(tmp_path / "all.safetensors")
    assert all(torch.equal(_bits(loaded[k]), _bits(sd[k])) for k in sd)
