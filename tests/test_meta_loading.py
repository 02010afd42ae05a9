"""Big-model loading: replace_linear on a model built under ``torch.device("meta")`` (no
memory), then ``load_state_dict(..., assign=True)``, or ``to_empty(device=...)`` followed by
``load_state_dict``, for every kind. A checkpoint of the converted model (quantized, or
switchback / fp8 float) loads as it is; a float checkpoint is quantized as it loads into a
meta-built quantized layer (its weight then exists for the first time). The loaded model's
outputs are bit-identical to converting a real model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_ops.replace import replace_linear

KINDS = ["nf4", "fp4", "int8", "int8-lt", "switchback", "switchback-global", "switchback-vectorwise",
         "fp8", "fp8-global"]
QUANTIZED = {"nf4", "fp4", "int8", "int8-lt"}


class Net(nn.Module):
    """Embedding, two blocks of Linear layers (one without bias), a skipped head."""

    def __init__(self, d=64, hidden=96, vocab=40):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d, bias=False)
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, tokens):
        h = self.emb(tokens)
        h = h + self.down(torch.relu(self.up(h)))
        return self.lm_head(self.norm(h))


def _real(kind, seed=0):
    torch.manual_seed(seed)
    model = Net()
    float_sd = {k: v.clone() for k, v in model.state_dict().items()}
    replace_linear(model, kind, verbose=False)
    return model.eval(), float_sd


def _meta(kind):
    with torch.device("meta"):
        model = Net()
    report = replace_linear(model, kind, verbose=False)
    assert report.replaced == ["up", "down"]
    assert all(p.device.type == "meta" for p in model.parameters())
    return model.eval()


TOKENS = torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(1))


def _check(model, ref):
    assert all(t.device.type == "cpu" for t in list(model.parameters()) + list(model.buffers()))
    with torch.no_grad():
        assert torch.equal(model(TOKENS), ref(TOKENS))
    got, want = model.state_dict(), ref.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("kind", KINDS)
def test_converted_checkpoint_assign(kind):
    ref, _ = _real(kind)
    model = _meta(kind)
    result = model.load_state_dict(ref.state_dict(), assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    _check(model, ref)


@pytest.mark.parametrize("kind", KINDS)
def test_converted_checkpoint_after_to_empty(kind):
    ref, _ = _real(kind)
    model = _meta(kind).to_empty(device="cpu")
    model.load_state_dict(ref.state_dict())
    _check(model, ref)


@pytest.mark.parametrize("kind", KINDS)
def test_float_checkpoint_assign(kind):
    ref, float_sd = _real(kind)
    model = _meta(kind)
    model.load_state_dict(float_sd, assign=True)
    _check(model, ref)


@pytest.mark.parametrize("kind", KINDS)
def test_float_checkpoint_after_to_empty(kind):
    """to_empty gives the layer an (uninitialized) weight on the device: a quantized layer's is
    then quantized garbage, and a float checkpoint loaded into a quantized layer is quantized
    on load, as for any already-quantized layer."""
    ref, float_sd = _real(kind)
    model = _meta(kind).to_empty(device="cpu")
    model.load_state_dict(float_sd)
    _check(model, ref)


@pytest.mark.parametrize("kind", sorted(QUANTIZED))
def test_meta_layers_keep_their_options(kind):
    """The options replace_linear was given survive the load (blocksize, double quant,
    threshold, compute dtype)."""
    opts = ({"blocksize": 128, "compress_statistics": False, "compute_dtype": torch.bfloat16}
            if kind in ("nf4", "fp4") else {"threshold": 3.0})
    torch.manual_seed(0)
    real = Net()
    float_sd = {k: v.clone() for k, v in real.state_dict().items()}
    replace_linear(real, kind, verbose=False, **opts)
    with torch.device("meta"):
        model = Net()
    replace_linear(model, kind, verbose=False, **opts)
    model.load_state_dict(float_sd, assign=True)
    _check(model.eval(), real.eval())
    if kind in ("nf4", "fp4"):
        s = model.up.weight.quant_state
        assert s.blocksize == 128 and not s.nested and model.up.compute_dtype == torch.bfloat16
    else:
        assert model.up.threshold == 3.0


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_meta_forward_refuses_clearly(kind):
    model = _meta(kind)
    with pytest.raises((RuntimeError, NotImplementedError, ValueError)):
        model.up(torch.randn(2, 64))
