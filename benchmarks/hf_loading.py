"""Quantize-while-loading numbers (issue 24) on a ~1.1B-parameter Llama (TinyLlama's shapes,
random weights), saved in bf16 in 1 GB shards: no download.

    python -m benchmarks.hf_loading make DIR DEVICE            # build and save the model
    python -m benchmarks.hf_loading load DIR DEVICE WHICH OUT  # WHICH: qk (QKernelsConfig nf4),
        # ref (bf16 load, then replace_linear nf4), bnb (BitsAndBytesConfig nf4): prints load
        # time, the peak-RSS rise while loading and the model size; saves logits to OUT
    python -m benchmarks.hf_loading qlora DIR DEVICE           # 20 QLoRA steps with PEFT and with
        # add_lora (same seed), then merge_and_unload against its bound (weights, each layer's
        # output on its own input, the logits beside the base model's without adapters)

Compare the OUT files of qk and ref with torch.equal (bit-identical expected)."""
import json, os, sys, time
import torch

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

mode, path, DEVICE = sys.argv[1], sys.argv[2], sys.argv[3]
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
TOK = torch.randint(0, 32000, (2, 16), generator=torch.Generator().manual_seed(0))

if mode == "make":
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cpu"):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(path, max_shard_size="1GB")
    sh = [os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")]
    print(json.dumps({"params": sum(p.numel() for p in m.parameters()), "shards": sh}))

elif mode == "load":
    device, which, out = DEVICE, sys.argv[4], sys.argv[5]
    from torch_ops import QKernelsConfig, replace_linear
    import transformers.models.llama.modeling_llama  # noqa: F401  (imports before measuring)
    if which == "bnb":
        from transformers import BitsAndBytesConfig
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    t = time.time()
    if which == "qk":
        m = AutoModelForCausalLM.from_pretrained(path, quantization_config=QKernelsConfig(kind="nf4"), device_map={"": device})
    elif which == "bnb":
        m = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True), device_map={"": device})
    else:
        m = AutoModelForCausalLM.from_pretrained(path, device_map={"": device})
        if which == "ref":
            replace_linear(m, "nf4", verbose=False)
    secs = time.time() - t
    rise = status("VmHWM") - before
    q = sum(t.numel() * t.element_size() for t in m.state_dict().values())
    with torch.no_grad():
        logits = m(TOK.to(device)).logits.float().cpu()
    torch.save(logits, out)
    print(json.dumps({"device": device, "which": which, "load_s": round(secs, 1), "rss_rise_MB": round(rise / 2**20),
                      "model_MB": round(q / 2**20), "footprint_MB": round(m.get_memory_footprint() / 2**20)}))

elif mode == "qlora":
    import warnings
    from peft import LoraConfig, get_peft_model
    from torch_ops import QKernelsConfig, add_lora
    from torch_ops.lora import dequantized_weight
    import torch_ops.peft_lora  # noqa: F401
    from reference.codebooks import nf4_map
    shape = (4, 128) if DEVICE != "cpu" else (2, 32)  # 2 CPU cores: fewer tokens
    tok = torch.randint(0, 32000, shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    T = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def run(which):
        m = AutoModelForCausalLM.from_pretrained(path, quantization_config=QKernelsConfig(kind="nf4"), device_map={"": DEVICE})
        torch.manual_seed(123)
        if which == "peft":
            m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules=T))
        else:
            add_lora(m, rank=16, alpha=32, targets=T)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4)
        losses = []
        for _ in range(20):
            loss = m(tok, labels=tok).loss
            opt.zero_grad(); loss.backward(); opt.step()
            losses.append(loss.item())
        return m, losses
    t = time.time()
    pm, a = run("peft")
    _, b = run("add_lora")
    res = {"steps_s": round(time.time() - t, 1), "loss_first_last": [a[0], a[-1]],
           "max_loss_diff_peft_vs_add_lora": max(abs(x - y) for x, y in zip(a, b))}
    code = torch.tensor(nf4_map()).sort().values
    half_gap = ((code[1:] - code[:-1]).max() / 2).item()
    layers = {n: l for n, l in pm.named_modules() if type(l).__name__ == "LoraLinear4bit"}
    exact = {n: dequantized_weight(l.get_base_layer()).float() + l.get_delta_weight("default").float()
             for n, l in layers.items()}
    ids = tok[:2, :16]
    inputs = {}  # each LoRA layer's input in the unmerged forward (the per-layer check below)
    hooks = [l.register_forward_pre_hook(lambda mod, a, n=n: inputs.__setitem__(n, a[0].detach().float()))
             for n, l in layers.items()]
    with torch.no_grad():
        unmerged = pm(ids).logits.float()
        with pm.disable_adapter():
            base_only = pm(ids).logits.float()
    for h in hooks:
        h.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_model = pm.merge_and_unload()
    worst = layer_worst = 0.0
    delta_over_step = []
    for n, W in exact.items():
        base = merged_model.get_submodule(n.removeprefix("base_model.model."))
        bs = base.weight.quant_state.blocksize
        flat = W.flatten()
        pad = (-flat.numel()) % bs
        a_true = torch.nn.functional.pad(flat.abs(), (0, pad)).view(-1, bs).amax(1)
        deq = dequantized_weight(base).float()
        a_q = torch.nn.functional.pad(deq.flatten().abs(), (0, pad)).view(-1, bs).amax(1)
        # |NF4(w) - w| <= half the widest code gap x the block's absmax, plus the rounding of
        # that absmax (double quantization)
        E = (half_gap * a_true + (a_true - a_q).abs() + 1e-6).repeat_interleave(bs)[: flat.numel()].view_as(W)
        worst = max(worst, ((deq - W).abs() / E).max().item())
        # per layer, on the unmerged model's own input x: |x (Wq - W)^T| <= |x| E^T (float64)
        x = inputs[n].reshape(-1, W.shape[1]).double()
        diff = (x @ (deq.double() - W.double()).T).abs()
        layer_worst = max(layer_worst, (diff / (x.abs() @ E.double().T + 1e-30)).max().item())
        dW = layers[n].get_delta_weight("default").float().abs()
        step = (half_gap * a_true).repeat_interleave(bs)[: flat.numel()].view_as(W)
        delta_over_step.append((dW / step).median().item())
    with torch.no_grad():
        merged = merged_model(ids).logits.float()
        fl = AutoModelForCausalLM.from_pretrained(path, device_map={"": DEVICE})(ids).logits.float()
        qm = AutoModelForCausalLM.from_pretrained(path, quantization_config=QKernelsConfig(kind="nf4"), device_map={"": DEVICE})(ids).logits.float()
    res.update({"weight_err_over_bound_max": worst, "layer_output_err_over_bound_max": layer_worst,
                "adapter_delta_over_half_step_median": sorted(delta_over_step)[len(delta_over_step) // 2],
                "merged_vs_unmerged_max_abs": (merged - unmerged).abs().max().item(),
                "unmerged_vs_base_max_abs": (unmerged - base_only).abs().max().item(),
                "merged_vs_base_max_abs": (merged - base_only).abs().max().item(),
                "nf4_vs_bf16_max_abs": (qm - fl).abs().max().item(), "logits_max_abs": unmerged.abs().max().item()})
    print(json.dumps(res))
