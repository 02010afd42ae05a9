"""PEFT LoRA over this library's Linear4bit / Linear8bitLt (torch_ops.peft_lora): get_peft_model
wraps them, training, merge / unmerge / merge_and_unload (dequantize, add, re-quantize),
adapter save and load, refusals that leave the model unchanged, and parity with
torch_ops.add_lora. Tiny Llama-architecture models built from a config (no download)."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

import torch_ops.peft_lora  # noqa: E402,F401  registers our LoRA layers with PEFT
from torch_ops import Linear4bit, Linear8bitLt, QKernelsConfig, add_lora, replace_linear  # noqa: E402
from torch_ops.lora import dequantized_weight  # noqa: E402
from torch_ops.peft_lora import LoraLinear4bit, LoraLinear8bitLt  # noqa: E402
from reference.codebooks import nf4_map  # noqa: E402

TOKENS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "v_proj", "down_proj"]
WRAPPER = {"nf4": LoraLinear4bit, "int8": LoraLinear8bitLt}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama_peft")
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return str(path)


def _load(path, kind, **kw):
    # compress_statistics=False keeps the requantization bound below simple (exact absmax)
    extra = {"compress_statistics": False} if kind != "int8" else {}
    kw.setdefault("device_map", {"": "cpu"})   # the quantizer would pick a GPU where there is one
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=QKernelsConfig(kind=kind, **extra),
                                                dtype=torch.float32, **kw)


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def _train(model, steps=5, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        out = model(TOKENS, labels=TOKENS)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses


def _lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoraLinear4bit, LoraLinear8bitLt))}


def _frozen_bytes(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_get_peft_model_wraps_our_layers_and_trains_only_adapters(llama_dir, kind):
    model = get_peft_model(_load(llama_dir, kind), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    layers = _lora_layers(model)
    assert len(layers) == 6 and all(type(m) is WRAPPER[kind] for m in layers.values())
    assert all(type(m.get_base_layer()) is (Linear4bit if kind == "nf4" else Linear8bitLt) for m in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    frozen = _frozen_bytes(model)
    losses = _train(model)
    assert losses[-1] < losses[0]
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())


def test_plain_torch_model_from_replace_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    replace_linear(model, "nf4", skip=(), verbose=False)
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["0", "2"]))
    assert [type(m) for m in _lora_layers(model).values()] == [LoraLinear4bit, LoraLinear4bit]
    x = torch.randn(3, 32)
    out = model(x)
    out.sum().backward()
    assert model.base_model.model[0].lora_A["default"].weight.grad is not None


def _nf4_bound(layer) -> torch.Tensor:
    """Per-element bound on one NF4 re-quantization (absmax stored exactly: no double quant):
    a value of a block with absmax a is stored as the nearest code of a * NF4, so it moves by
    at most a * (half the widest gap between neighbouring NF4 codes), plus float32 rounding."""
    code = torch.tensor(nf4_map(), dtype=torch.float32).sort().values
    half_gap = (code[1:] - code[:-1]).max().item() / 2
    s = layer.weight.quant_state
    absmax = s.absmax.float().repeat_interleave(s.blocksize)[: layer.out_features * layer.in_features]
    return (absmax * half_gap * (1 + 1e-6) + 1e-7).reshape(layer.out_features, layer.in_features)


def _int8_bound(layer, W) -> torch.Tensor:
    """One int8 row quantization (via float16, docs/FORMATS.md §9): half a step SCB / 127 of that row, plus
    the float16 rounding of the value."""
    scb = layer.weight.SCB.float()
    return 0.5 * scb[:, None] / 127 * (1 + 1e-3) + W.abs() * 2.0 ** -10 + 1e-7


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_unmerge_and_merge_and_unload(llama_dir, kind):
    """merge = dequantize, add B @ A * scaling in float32, re-quantize with the layer's settings
    (the stored weight is exactly a fresh quantization of that sum); PEFT's rounding warning
    is given; the merged weight is within one quantization step of the exact sum, so the
    merged model's outputs are within the requantization error of the unmerged model's."""
    model = get_peft_model(_load(llama_dir, kind), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    _train(model, steps=3, lr=5e-2)
    unmerged = _logits(model)
    layers = _lora_layers(model)
    exact = {n: dequantized_weight(m.get_base_layer()) + m.get_delta_weight("default") for n, m in layers.items()}
    before = {n: dequantized_weight(m.get_base_layer()) for n, m in layers.items()}
    with pytest.warns(UserWarning, match="re-quantizes its weight"):
        model.merge_adapter()
    bounds = {}
    for n, m in layers.items():
        base = m.get_base_layer()
        fresh = type(base).from_linear(_as_linear(exact[n]), **_options(base))
        assert torch.equal(dequantized_weight(base), dequantized_weight(fresh)), n
        bounds[n] = _nf4_bound(base) if kind == "nf4" else _int8_bound(base, exact[n])
        assert ((dequantized_weight(base) - exact[n]).abs() <= bounds[n]).all(), n
    merged = _logits(model)
    assert (merged - unmerged).abs().max() < 0.5 * unmerged.abs().max()
    assert not torch.equal(merged, unmerged)
    with pytest.warns(UserWarning, match="re-quantizes its weight"):
        model.unmerge_adapter()
    for n, m in layers.items():   # back within the two quantization steps taken, not bit-exactly
        base = m.get_base_layer()
        bound = _nf4_bound(base) if kind == "nf4" else _int8_bound(base, before[n])
        assert ((dequantized_weight(base) - before[n]).abs() <= bounds[n] + bound).all(), n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.merge_and_unload()
    assert not _lora_layers(out)
    assert type(out.model.layers[0].self_attn.q_proj) is (Linear4bit if kind == "nf4" else Linear8bitLt)
    assert (_logits(out) - unmerged).abs().max() < 0.5 * unmerged.abs().max()


def _as_linear(W):
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    return lin


def _options(base):
    if isinstance(base, Linear4bit):
        w = base.weight
        return dict(quant_type=w.quant_type, compress_statistics=w.compress_statistics, blocksize=w.blocksize)
    return dict(has_fp16_weights=False, threshold=base.threshold)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_adapter_save_and_load(tmp_path, llama_dir, kind):
    from safetensors.torch import load_file
    model = get_peft_model(_load(llama_dir, kind), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    _train(model, steps=3)
    want = _logits(model)
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert len(keys) == 12 and all("lora_A" in k or "lora_B" in k for k in keys)
    again = PeftModel.from_pretrained(_load(llama_dir, kind), tmp_path)
    assert all(type(m) is WRAPPER[kind] for m in _lora_layers(again).values()) and len(_lora_layers(again)) == 6
    assert torch.equal(_logits(again), want)


def test_unmergeable_adapter_dtype_is_refused_and_the_model_is_unchanged(llama_dir):
    model = get_peft_model(_load(llama_dir, "nf4"), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    _train(model, steps=2)
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.data = layer.lora_B["default"].weight.data.to(torch.float8_e4m3fn)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    for call in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(ValueError, match=r"(?s)model is unchanged.*layers\.1\.self_attn\.v_proj.*float8_e4m3fn"):
            call()
        assert {n: type(m) for n, m in model.named_modules()} == types
        after = model.state_dict()
        assert set(after) == set(state) and all(torch.equal(after[k], v) for k, v in state.items())
        assert not any(m.merged for m in _lora_layers(model).values())


def test_safe_merge_refuses_non_finite_and_changes_nothing(llama_dir):
    model = get_peft_model(_load(llama_dir, "int8"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    before = layer.get_base_layer().weight.clone()
    with pytest.raises(ValueError, match="NaNs detected"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, before) and not layer.merged


def test_dora_is_refused(llama_dir):
    with pytest.raises(ValueError, match="unsupported variant"):
        get_peft_model(_load(llama_dir, "nf4"), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))


def test_peft_qlora_matches_add_lora(llama_dir, dtype=torch.bfloat16):
    """The same seed gives the same adapters (same init order and calls) and the same forward
    (the adapter's output added in float32 and rounded once, which matters in bfloat16):
    20 QLoRA steps agree within 1e-5 (measured: bit-identical, in float32 too)."""
    def run(which):
        model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=QKernelsConfig(kind="nf4"),
                                                     dtype=dtype, device_map={"": "cpu"})
        torch.manual_seed(123)
        if which == "peft":
            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
        else:
            add_lora(model, rank=4, alpha=8, targets=TARGETS)
        return _train(model, steps=20)
    a, b = run("peft"), run("add_lora")
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5 and a[-1] < a[0]


@pytest.mark.gpu
def test_qlora_on_gpu(llama_dir, tmp_path):
    """The CPU tests' path on CUDA: load NF4 onto the GPU, PEFT QLoRA steps, adapter save and
    load, merge_and_unload within the requantization error."""
    model = _load(llama_dir, "nf4", device_map={"": 0})
    assert model.model.layers[0].mlp.up_proj.weight.device.type == "cuda"
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    global TOKENS
    cpu_tokens, TOKENS = TOKENS, TOKENS.cuda()
    try:
        losses = _train(model, steps=10)
        assert losses[-1] < losses[0]
        want = _logits(model)
        model.save_pretrained(tmp_path)
        again = PeftModel.from_pretrained(_load(llama_dir, "nf4", device_map={"": 0}), tmp_path)
        assert torch.allclose(_logits(again), want, atol=1e-5, rtol=0)
        layers = _lora_layers(again)
        exact = {n: dequantized_weight(m.get_base_layer()) + m.get_delta_weight("default") for n, m in layers.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged = again.merge_and_unload()
        for n in exact:
            base = merged.get_submodule(n.removeprefix("base_model.model."))
            assert ((dequantized_weight(base) - exact[n]).abs() <= _nf4_bound(base).cuda()).all(), n
        assert (_logits(merged) - want).abs().max() < 0.5 * want.abs().max()
    finally:
        TOKENS = cpu_tokens
