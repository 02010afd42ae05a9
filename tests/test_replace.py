"""replace_linear on models whose structure is not a plain tree: a layer shared under two
names, weights tied between layers (and with an embedding), and conversions that must fail
as a whole (validation first, nothing changed on error)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_ops.linear4bit import Linear4bit, Params4bit
from torch_ops.linear8bit import Int8Params, Linear8bitLt
from torch_ops.replace import replace_linear

FLOAT_KINDS = ["switchback", "switchback-vectorwise", "fp8", "fp8-global"]
QUANT_KINDS = ["nf4", "fp4", "int8", "int8-lt"]
QPARAM = {"nf4": Params4bit, "fp4": Params4bit, "int8": Int8Params, "int8-lt": Int8Params}


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Shared(nn.Module):
    """One nn.Linear reachable as ``a`` and ``b``, plus one of its own."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = self.a
        self.c = nn.Linear(32, 16)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


class Tied(nn.Module):
    """Two distinct nn.Linear modules sharing one weight Parameter (biases of their own)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 48)
        self.b = nn.Linear(32, 48)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.a(x) + self.b(x)


class TiedHead(nn.Module):
    """A language-model head tied to its embedding (GPT-2 style)."""

    def __init__(self, vocab=64, d=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mlp = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, tokens):
        return self.lm_head(self.mlp(self.emb(tokens)))


def _snapshot(model):
    """Everything a failed conversion must leave as it was: each name's module object and
    each parameter name's Parameter object with its values."""
    return ({n: m for n, m in model.named_modules(remove_duplicate=False)},
            {n: (p, p.detach().clone()) for n, p in model.named_parameters(remove_duplicate=False)})


def _assert_unchanged(model, snap):
    modules, params = snap
    now = dict(model.named_modules(remove_duplicate=False))
    assert now.keys() == modules.keys()
    for n, m in modules.items():
        assert now[n] is m, n
    now_p = dict(model.named_parameters(remove_duplicate=False))
    assert now_p.keys() == params.keys()
    for n, (p, v) in params.items():
        assert now_p[n] is p and torch.equal(p.detach(), v), n


# --- a module shared under two names --------------------------------------------------------

@pytest.mark.parametrize("kind", ["nf4", "int8", "switchback", "fp8"])
def test_shared_module_is_converted_once_under_every_name(kind):
    torch.manual_seed(0)
    model = Shared()
    report = replace_linear(model, kind, skip=(), verbose=False)
    assert type(model.a) is not nn.Linear and model.a is model.b
    assert model._modules["a"] is model._modules["b"]
    assert report.replaced == ["a", "b", "c"]
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert not any(t.is_meta for t in model.state_dict().values())
    assert model(torch.randn(3, 32)).shape == (3, 16)


def test_shared_module_skipped_under_one_name_is_skipped_under_all():
    """skip protects the layer object: a layer skipped under one of its names stays float
    under every name (converting it would change the skipped name too)."""
    model = Shared()
    a = model.a
    report = replace_linear(model, "nf4", skip=("b",), verbose=False)
    assert model.a is a and model.b is a and type(a) is nn.Linear
    assert report.replaced == ["c"] and report.skipped == ["a", "b"]


# --- tied weights ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", FLOAT_KINDS)
def test_tied_weights_stay_tied_for_float_kinds(kind):
    torch.manual_seed(1)
    model = Tied()
    w, ba, bb = model.a.weight, model.a.bias, model.b.bias
    replace_linear(model, kind, skip=(), verbose=False)
    assert type(model.a) is not nn.Linear and type(model.b) is not nn.Linear
    # the same Parameter object (so one optimizer entry, one gradient), not equal copies
    assert model.a.weight is model.b.weight is w
    assert model.a.bias is ba and model.b.bias is bb
    assert len(list(model.parameters())) == 3
    x = torch.randn(4, 32)
    model(x).square().sum().backward()
    assert w.grad is not None
    with torch.no_grad():
        w.add_(1.0)   # an optimizer step updates both layers
    assert torch.equal(model.a.weight, model.b.weight)


@pytest.mark.parametrize("kind", FLOAT_KINDS)
def test_embedding_tied_head_stays_tied_for_float_kinds(kind):
    model = TiedHead()
    emb_w = model.emb.weight
    report = replace_linear(model, kind, skip=(), verbose=False)
    assert report.replaced == ["mlp", "lm_head"]
    assert model.lm_head.weight is emb_w and model.emb.weight is emb_w


@pytest.mark.parametrize("kind", QUANT_KINDS)
def test_tied_weights_share_one_quantized_parameter(kind):
    torch.manual_seed(2)
    model = Tied()
    x = torch.randn(4, 32)
    ref = model(x).detach()
    ba, bb = model.a.bias, model.b.bias
    report = replace_linear(model, kind, skip=(), verbose=False)
    assert report.replaced == ["a", "b"]
    assert isinstance(model.a.weight, QPARAM[kind]) and model.a.weight is model.b.weight
    assert model.a.bias is ba and model.b.bias is bb
    assert report.bytes_after < report.bytes_before
    assert not any(t.is_meta for t in model.state_dict().values())
    with torch.no_grad():
        out = model(x)
        # one weight: the two layers differ only by their biases (added in float32)
        torch.testing.assert_close(model.a(x) - ba, model.b(x) - bb, atol=1e-6, rtol=0)
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.98


@pytest.mark.parametrize("kind", QUANT_KINDS)
def test_quantized_head_tied_to_a_float_embedding_is_refused(kind):
    """A quantized layer cannot share its weight with a float module: an error naming both
    (and the way out), and the model unchanged."""
    model = TiedHead()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"'lm_head'.*emb\.weight.*skip"):
        replace_linear(model, kind, skip=(), verbose=False)
    _assert_unchanged(model, snap)
    # the default skip keeps the tied head in float: fine
    report = replace_linear(model, kind, verbose=False)
    assert report.replaced == ["mlp"] and model.lm_head.weight is model.emb.weight


@pytest.mark.parametrize("kind", QUANT_KINDS)
def test_quantized_layer_tied_to_a_skipped_layer_is_refused(kind):
    model = Tied()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"'a'.*'b'|'b'.*'a'"):
        replace_linear(model, kind, skip=("b",), verbose=False)
    _assert_unchanged(model, snap)


# --- all or nothing -------------------------------------------------------------------------

def _mixed_model():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    model[2].double()   # the layer our layers cannot take, after one they can
    return model


@pytest.mark.parametrize("kind", QUANT_KINDS + FLOAT_KINDS)
def test_a_layer_that_cannot_be_converted_changes_nothing(kind):
    model = _mixed_model()
    snap = _snapshot(model)
    with pytest.raises(TypeError, match=r"'2'.*float64.*float16, bfloat16 or float32"):
        replace_linear(model, kind, skip=(), verbose=False)
    _assert_unchanged(model, snap)
    report = replace_linear(model, kind, skip=("2",), verbose=False)   # skipping it works
    assert report.replaced == ["0", "4"] and type(model[2]) is nn.Linear


@pytest.mark.parametrize("kind,options,error,match", [
    ("nf4", {"compute_dtype": torch.int8}, ValueError, "compute_dtype"),
    ("nf4", {"blocksize": 100}, ValueError, "blocksize"),
    ("int8", {"threshold": -1.0}, ValueError, "threshold"),
    ("switchback", {"vector_wise_quantization": True, "mem_efficient": True}, ValueError, "mem_efficient"),
    ("fp8", {"fp8_weight_grad": True}, ValueError, "native"),
    ("nf4", {"no_such_option": 1}, TypeError, "no_such_option"),
    ("switchback", {"quant_type": "nf4"}, TypeError, "quant_type"),
])
def test_a_bad_option_changes_nothing(kind, options, error, match):
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    snap = _snapshot(model)
    with pytest.raises(error, match=match):
        replace_linear(model, kind, skip=(), verbose=False, **options)
    _assert_unchanged(model, snap)


def test_an_error_while_quantizing_changes_nothing(monkeypatch):
    """Errors validation cannot foresee (out of memory on the device) come after every new
    layer is built and before any is put in place: the model is unchanged."""
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    snap = _snapshot(model)
    real = Linear4bit.from_linear.__func__
    calls = []

    def failing(cls, linear, **options):
        calls.append(linear)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(cls, linear, **options)

    monkeypatch.setattr(Linear4bit, "from_linear", classmethod(failing))
    with pytest.raises(torch.OutOfMemoryError):
        replace_linear(model, "nf4", skip=(), verbose=False)
    assert len(calls) == 2
    _assert_unchanged(model, snap)


def test_argument_errors_name_the_argument():
    model = nn.Sequential(nn.Linear(16, 8))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        replace_linear([nn.Linear(4, 4)], "nf4")
    with pytest.raises(TypeError, match="skip must be"):
        replace_linear(model, "nf4", skip=[3])
    with pytest.raises(TypeError, match="replace_linear converts the nn.Linear layers inside"):
        replace_linear(nn.Linear(4, 4), "nf4")
    assert type(model[0]) is nn.Linear
    assert isinstance(replace_linear(model, "int8", skip=None, verbose=False).replaced, list)
    assert isinstance(model[0], Linear8bitLt)


@pytest.mark.parametrize("kind", ["nf4", "int8", "switchback", "fp8"])
def test_converted_layers_keep_train_or_eval_mode(kind):
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    replace_linear(model, kind, skip=(), verbose=False)
    assert not any(m.training for m in model.modules())
    model.train()
    replace_linear(model, "int8", skip=(), verbose=False)   # nothing left to convert
    assert all(m.training for m in model.modules())
