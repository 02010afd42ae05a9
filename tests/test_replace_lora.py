"""replace_linear (model conversion, skip list, progress, memory report, a conv + linear model
beside bitsandbytes) and LoRA / QLoRA. Shared layers, tied weights and all-or-nothing
conversion: tests/test_replace.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_ops.linear4bit import Linear4bit
from torch_ops.linear8bit import Linear8bitLt
from torch_ops.lora import LoRA, add_lora, load_lora_state_dict, lora_state_dict, merge_lora
from torch_ops.replace import model_bytes, replace_linear


class TinyLM(nn.Module):
    def __init__(self, d=128, hidden=256, vocab=96):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)) for _ in range(2))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        h = self.emb(tokens)
        for block in self.blocks:
            h = h + block(h)
        return self.lm_head(h)


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return TinyLM().to(dtype)


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


@pytest.mark.parametrize("kind,cls,min_ratio", [("nf4", Linear4bit, 3.0), ("fp4", Linear4bit, 3.0),
                                                ("int8", Linear8bitLt, 1.8), ("int8-lt", Linear8bitLt, 1.8)])
def test_replace_linear_converts_skips_and_reports(kind, cls, min_ratio, capsys):
    model = _model(torch.bfloat16)
    tokens = torch.randint(0, 96, (2, 5))
    ref = model(tokens).detach()
    linear_bytes = sum(m.weight.numel() * 2 for n, m in model.named_modules()
                       if isinstance(m, nn.Linear) and n != "lm_head")
    report = replace_linear(model, kind, skip=("lm_head",))
    assert report.replaced == ["blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2"]
    assert report.skipped == ["lm_head"] and type(model.lm_head) is nn.Linear
    assert all(isinstance(model.blocks[i][j], cls) for i in (0, 1) for j in (0, 2))
    saved = report.bytes_before - report.bytes_after
    assert saved >= linear_bytes * (1 - 1 / min_ratio)
    assert report.bytes_after == model_bytes(model)
    assert "replace_linear: 4 nn.Linear" in capsys.readouterr().err
    out = model(tokens)
    assert out.dtype == torch.bfloat16 and _cos(out, ref) > 0.99


def test_replace_linear_progress_bar_and_errors(capsys):
    replace_linear(_model(), "nf4", progress=True, verbose=False)
    assert "replace_linear -> nf4" in capsys.readouterr().err
    with pytest.raises(ValueError, match="kind must be one of.*got 'int3'"):
        replace_linear(_model(), "int3")


@pytest.mark.parametrize("kind,module", [("switchback", "torch_ops.switchback"), ("fp8", "torch_ops.fp8")])
def test_replace_linear_training_kinds(kind, module):
    """The training layers keep nn.Linear's float Parameters: the new layer holds the old
    Parameter objects, so an optimizer made before the conversion still trains it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 64)
    ref = model(x).detach()
    weight, before = model[0].weight, model[0].weight.detach().clone()
    report = replace_linear(model, kind, skip=(), verbose=False)
    assert report.replaced == ["0", "2"] and type(model[0]).__module__ == module
    assert model[0].weight is weight
    out = model(x)
    assert out.shape == ref.shape and _cos(out, ref) > 0.98
    out.pow(2).mean().backward()
    assert model[0].weight.grad is not None
    opt.step()
    assert not torch.equal(model[0].weight, before)


def test_fresh_lora_is_the_identity_and_validates():
    base = Linear4bit.from_linear(nn.Linear(128, 64), quant_type="nf4")
    lora = LoRA(base, rank=4, alpha=8)
    x = torch.randn(3, 128)
    assert torch.equal(lora(x), base(x))
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]
    with pytest.raises(ValueError, match="rank"):
        LoRA(base, rank=0)
    with pytest.raises(TypeError, match="in_features"):
        LoRA(nn.ReLU())


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_training_changes_only_adapters(kind):
    """The QLoRA recipe: quantize, add adapters, train. Loss goes down; the quantized weights,
    their state and every non-adapter parameter are bit-for-bit unchanged."""
    torch.manual_seed(0)
    model = TinyLM(d=64, hidden=128, vocab=32)
    replace_linear(model, kind, verbose=False)
    wrapped = add_lora(model, rank=8, alpha=16, dropout=0.0)
    assert len(wrapped) == 4
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 8
    opt = torch.optim.AdamW(trainable, lr=2e-2)
    tokens = torch.randint(0, 32, (4, 8))
    target = torch.roll(tokens, 1, dims=1)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    after = model.state_dict()
    for k, v in frozen.items():
        assert torch.equal(after[k], v), k


# --- accuracy on a small conv + linear model, beside bitsandbytes ----------------------------

class ONet(nn.Module):
    """The shape of MTCNN's output network (facenet-pytorch's onet); 48x48 face crops ->
    (face prob (2), box (4), landmarks (10)). Its Linear layers: dense5 1152 -> 256,
    dense6_{1,2,3} 256 -> 2, 4, 10 (output sizes no kernel tiles evenly)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

    def forward(self, x):
        pool = nn.functional.max_pool2d
        x = pool(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = pool(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = pool(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)))
        return torch.cat([self.dense6_1(x).softmax(1), self.dense6_2(x), self.dense6_3(x)], 1)


def _onet(seed=1):
    """ONet with seeded weights; the Linear weights heavy-tailed (Student-t, 4 degrees of
    freedom, at the default init's scale), as trained weights are, which makes 4-bit
    quantization harder than the uniform default init does."""
    torch.manual_seed(seed)
    model = ONet()
    with torch.no_grad():
        for m in model.modules():
            if type(m) is nn.Linear:
                w = torch.distributions.StudentT(4.0).sample(m.weight.shape)
                m.weight.copy_(w * (m.weight.std() / w.std()))
    return model.eval()


@pytest.mark.parametrize("kind,bound", [("nf4", 0.999), ("int8", 0.9999)])
def test_conv_linear_model_outputs_stay_close(kind, bound):
    """Cosine similarity of the quantized model's outputs to fp32's on 32 random crops;
    bitsandbytes' layers side by side (train mode on CPU: its eval kernels need out % 32 == 0,
    and its CPU int8 path then skips activation quantization, so only the NF4 number is
    like for like: ours in train mode, float32 like bnb's there, must match it to 1e-6). Measured (CPU, bnb 0.50.2): 1 - cos is
    1.5e-4 (NF4, ours and bnb's within 2e-7 of each other) and 4.3e-6 (int8)."""
    import copy
    model = _onet()
    torch.manual_seed(0)
    x = torch.rand(32, 3, 48, 48) * 2 - 1
    with torch.no_grad():
        ref = model(x)
        quant = copy.deepcopy(model)
        replace_linear(quant, kind, skip=(), verbose=False)
        ours = _cos(quant(x), ref)
    assert ours > bound
    try:
        import bitsandbytes as bnb
    except Exception:
        return
    theirs = copy.deepcopy(model)
    for name in ("dense5", "dense6_1", "dense6_2", "dense6_3"):
        old = getattr(theirs, name)
        if kind == "nf4":
            layer = bnb.nn.Linear4bit(old.in_features, old.out_features, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(old.in_features, old.out_features, has_fp16_weights=False,
                                        threshold=6.0 if kind == "int8-lt" else 0.0)
        layer.load_state_dict(old.state_dict())
        setattr(theirs, name, layer.to("cpu"))
    with torch.no_grad():
        bnb_cos = _cos(theirs.train()(x), ref)
    assert bnb_cos > bound
    if kind == "nf4":  # both in train mode: float32 arithmetic (eval on a bf16 CPU: bfloat16)
        with torch.no_grad():
            ours_f32 = _cos(quant.train()(x), ref)
        assert abs(ours_f32 - bnb_cos) < 1e-6


# --- add_lora by name, merge, adapter-only state_dict ------------------------------------------

def _lora_model(kind="nf4", seed=0, **kw):
    torch.manual_seed(seed)
    model = TinyLM(d=64, hidden=128, vocab=32)
    replace_linear(model, kind, verbose=False)
    names = add_lora(model, rank=4, alpha=8, **kw)
    torch.manual_seed(seed + 1)
    with torch.no_grad():   # trained-looking adapters (a fresh B is zero)
        for m in model.modules():
            if isinstance(m, LoRA):
                m.lora_B.weight.normal_(0, 0.05)
    return model, names


@pytest.mark.parametrize("targets,want", [
    (["2"], ["blocks.0.2", "blocks.1.2"]),                    # a name suffix, as PEFT's target_modules
    (["blocks.0.0", "lm_head"], ["blocks.0.0", "lm_head"]),   # full names; a float nn.Linear too
    (r"blocks\.\d\.0", ["blocks.0.0", "blocks.1.0"]),         # a regex over the whole name
    (None, ["blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2"]),
    ((Linear4bit,), ["blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2"]),
])
def test_add_lora_targets(targets, want):
    model, names = _lora_model(targets=targets)
    assert names == want
    assert all(isinstance(model.get_submodule(n), LoRA) for n in names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}


def test_add_lora_bad_targets_change_nothing():
    torch.manual_seed(0)
    model = TinyLM(d=64, hidden=128, vocab=32)
    replace_linear(model, "nf4", verbose=False)
    before = [type(m) for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="match no module"):
        add_lora(model, targets=["query", "value"])
    with pytest.raises(TypeError, match="'emb' is a Embedding, which has no in_features"):
        add_lora(model, targets=["emb", "2"])
    with pytest.raises(TypeError, match="targets must be"):
        add_lora(model, targets=[3])
    with pytest.raises(ValueError, match="rank must be"):
        add_lora(model, rank=0, targets=["2"])
    assert [type(m) for m in model.modules()] == before and [p.requires_grad for p in model.parameters()] == grads
    add_lora(model, targets=["2"])
    with pytest.raises(ValueError, match="already has a LoRA"):
        add_lora(model, targets=["blocks.0.2"])


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_lora_merge_requantizes_and_unmerge_restores(kind):
    model, names = _lora_model(kind)
    tokens = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(tokens)
    lora = model.get_submodule(names[0])
    base = lora.base_layer
    from torch_ops.lora import dequantized_weight
    W0 = dequantized_weight(base)
    exact = W0 + lora.lora_B.weight @ lora.lora_A.weight * lora.scaling
    with pytest.warns(UserWarning, match="re-quantizes its weight"):
        lora.merge()
    assert lora.merged
    fresh = type(base).from_linear(_plain_linear(exact), **(
        dict(quant_type="nf4") if kind == "nf4" else dict(threshold=base.threshold)))
    assert torch.equal(dequantized_weight(base), dequantized_weight(fresh))   # one re-quantization of the sum
    with pytest.warns(UserWarning):
        lora.unmerge()
    assert not lora.merged
    # back within two requantization errors, not bit-exactly: one NF4 rounding moves a value by
    # at most half the widest gap of the NF4 codes (0.1385) times its block's absmax, which is
    # at most the tensor's max (+1% for the double-quantized absmax); int8's is far smaller
    W2 = dequantized_weight(base)
    step = (W2 - W0).abs().max()
    assert 0 < step <= 0.1385 * 1.01 * (exact.abs().max() + W2.abs().max())
    with pytest.warns(UserWarning):
        merged = merge_lora(model)
    assert merged == names and not any(isinstance(m, LoRA) for m in model.modules())
    with torch.no_grad():
        out = model(tokens)
    assert _cos(out, ref) > 0.99


def _plain_linear(W):
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    return lin


def test_merge_into_a_float_layer_is_exact_up_to_rounding():
    model, names = _lora_model(targets=["lm_head"])
    tokens = torch.randint(0, 32, (2, 6))
    with torch.no_grad():
        ref = model(tokens)
    merge_lora(model)
    assert type(model.lm_head) is nn.Linear
    with torch.no_grad():
        assert torch.allclose(model(tokens), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_lora_into_a_16bit_layer_keeps_the_whole_adapter(kind):
    """merge_lora(dtype=bfloat16): each quantized layer with its adapter becomes an nn.Linear
    of dequantize(W) + B A rounded once to bfloat16, with the bias; the model's output is the
    unmerged model's within bfloat16 rounding, however small the adapter is against the
    quantization step (where a re-quantizing merge rounds it away)."""
    from torch_ops.lora import dequantized_weight
    model, names = _lora_model(kind)
    with torch.no_grad():   # an adapter far below half an NF4 step
        for n in names:
            model.get_submodule(n).lora_B.weight.mul_(1e-3)
    tokens = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(3))
    loras = {n: model.get_submodule(n) for n in names}
    want_w = {n: (dequantized_weight(m.base_layer) + m.lora_B.weight @ m.lora_A.weight * m.scaling)
              for n, m in loras.items()}
    with torch.no_grad():
        ref = model(tokens)
    assert merge_lora(model, dtype=torch.bfloat16) == names
    for n in names:
        lin = model.get_submodule(n)
        assert type(lin) is nn.Linear and lin.weight.dtype == torch.bfloat16
        assert torch.equal(lin.weight, want_w[n].to(torch.bfloat16))
        base_bias = loras[n].base_layer.bias
        assert (lin.bias is None) == (base_bias is None)
        if base_bias is not None:
            assert torch.equal(lin.bias, base_bias.to(torch.bfloat16))
    model.to(torch.bfloat16)
    with torch.no_grad():
        out = model(tokens).float()
    assert _cos(out, ref) > 0.9999
    with pytest.raises(ValueError, match="unload=True"):
        merge_lora(_lora_model(kind)[0], unload=False, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="dtype must be"):
        merge_lora(_lora_model(kind)[0], dtype=torch.int8)


def test_merge_lora_refuses_an_unmergeable_adapter_and_changes_nothing():
    model, names = _lora_model()
    bad = model.get_submodule(names[2])
    bad.lora_A.weight.data = bad.lora_A.weight.data.to(torch.float8_e4m3fn)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"(?s)nothing was changed.*{names[2]}.*float8_e4m3fn"):
        merge_lora(model)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        bad.merge()
    assert all(isinstance(model.get_submodule(n), LoRA) and not model.get_submodule(n).merged for n in names)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())


def test_adapter_only_state_dict_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file
    model, names = _lora_model("nf4", seed=0)
    sd = lora_state_dict(model)
    assert sorted(sd) == sorted(f"{n}.lora_{ab}.weight" for n in names for ab in "AB")
    save_file(sd, tmp_path / "adapters.safetensors")
    torch.manual_seed(0)   # the same base model, fresh (zero-effect) adapters
    fresh = TinyLM(d=64, hidden=128, vocab=32)
    replace_linear(fresh, "nf4", verbose=False)
    add_lora(fresh, rank=4, alpha=8)
    assert load_lora_state_dict(fresh, load_file(tmp_path / "adapters.safetensors")) == ([], [])
    tokens = torch.randint(0, 32, (2, 6))
    with torch.no_grad():
        assert torch.equal(fresh(tokens), model(tokens))
    before = {k: v.clone() for k, v in lora_state_dict(fresh).items()}
    with pytest.raises(ValueError, match="missing.*blocks.0.0.lora_A.weight"):
        load_lora_state_dict(fresh, {k: v for k, v in sd.items() if "blocks.0.0" not in k})
    with pytest.raises(ValueError, match=r"blocks.0.2.lora_A.weight: checkpoint \(4, 64\), model \(4, 128\)"):
        load_lora_state_dict(fresh, {**sd, "blocks.0.2.lora_A.weight": torch.zeros(4, 64)})
    assert all(torch.equal(lora_state_dict(fresh)[k], v) for k, v in before.items())   # nothing loaded
    missing, unexpected = load_lora_state_dict(fresh, {**sd, "extra.weight": torch.zeros(1)}, strict=False)
    assert missing == [] and unexpected == ["extra.weight"]
