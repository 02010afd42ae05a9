"""The CPU section (``python -m benchmarks --ops cpu``): qkernels' host path beside
bitsandbytes' CPU backend and torch, measured in the same run, whatever the device.

- ops: quantize/dequantize_blockwise float32 2^24 (blocksize 4096), quantize/dequantize_4bit
  NF4 4096x4096 (blocksize 64), the AdamW8bit step over 1e7 float32 parameters (and torch's
  AdamW); best of 5 interleaved rounds.
- layers: Linear8bitLt threshold 0 and 6, LinearNF4 / LinearFP4 at MiniLM's shapes
  (384->1536 and 1536->384) on one batch of 32 sentences x 12 tokens (4-bit: by default,
  and with compute_dtype=float32); best of 15 rounds;
  and one token through a 4096->4096 NF4 / FP4 layer (decoding).
- model: a MiniLM-sized encoder (6 layers, hidden 384, 12 heads, intermediate 1536;
  transformers' BertModel from a config when transformers is installed, else the same
  shapes built here), random weights, every nn.Linear converted (replace_linear for
  qkernels; bitsandbytes' layers for bnb), 200 sentences of 8..16 tokens in batches of 32,
  the whole forward timed, best of 3, the variants interleaved; the fp32 model beside it.
  Random weights rarely exceed 6, so threshold 6 finds few outlier columns here.
Ratios are other_time / our_time (above 1: qkernels is faster).
``--sizes small`` shrinks everything to seconds (tensors 16x smaller, one layer shape, a
1-layer model on 16 sentences, fewer rounds).
"""
from __future__ import annotations

import copy
import logging
import time

import numpy as np

from .timing import Row, bitsandbytes_or_none

SECTION = "cpu"


def _bnb():
    bnb = bitsandbytes_or_none()
    if bnb is None:
        return None
    try:
        import bitsandbytes.functional  # noqa: F401
        return bnb
    except Exception:
        return None


def _best_us(fns: dict, repeat: int) -> dict:
    """Best wall-clock microseconds of each ``fns[name]()`` over ``repeat`` rounds, the
    contenders interleaved in each round (one warm-up call each). The best, not the median:
    on a shared 2-core machine a call that loses a core waits whole scheduler slices."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return {k: v * 1e6 for k, v in best.items()}


def _pair(op: str, size: str, dtype: str, ours: float, theirs: float | None,
          torch_us: float | None = None, bytes_: float = 0.0) -> list[Row]:
    rows = [Row(SECTION, op, size, dtype, "qkernels (CPU)", ours, bytes=bytes_)]
    if theirs is not None:
        rows[0].ratios["bnb"] = theirs / ours
        rows.append(Row(SECTION, op, size, dtype, "bitsandbytes (CPU)", theirs, bytes=bytes_))
    if torch_us is not None:
        rows[0].ratios["torch"] = torch_us / ours
    return rows


def op_rows(sizes: str) -> list[Row]:
    import torch
    import qkernels as Q
    from torch_ops import optim as O
    bnb = _bnb()
    F = None if bnb is None else bnb.functional
    small = sizes == "small"
    rng = np.random.default_rng(0)
    rows: list[Row] = []

    n = 1 << (20 if small else 24)
    x = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    q, s = Q.quantize_blockwise(x, blocksize=4096)
    fns = {("q", "ours"): lambda: Q.quantize_blockwise(x, blocksize=4096),
           ("d", "ours"): lambda: Q.dequantize_blockwise(q, s)}
    if F is not None:
        bq, bs = F.quantize_blockwise(x, blocksize=4096)
        fns[("q", "bnb")] = lambda: F.quantize_blockwise(x, blocksize=4096)
        fns[("d", "bnb")] = lambda: F.dequantize_blockwise(bq, bs)
    us = _best_us(fns, repeat=5)
    size = f"2^{n.bit_length() - 1} bs4096"
    for k, op in (("q", "quantize_blockwise"), ("d", "dequantize_blockwise")):
        rows += _pair(op, size, "float32", us[(k, "ours")], us.get((k, "bnb")), bytes_=n * 5)

    shape = (1024, 1024) if small else (4096, 4096)
    w = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    pq, ps = Q.quantize_4bit(w, blocksize=64, quant_type="nf4")
    fns = {("q", "ours"): lambda: Q.quantize_4bit(w, blocksize=64, quant_type="nf4"),
           ("d", "ours"): lambda: Q.dequantize_4bit(pq, ps)}
    if F is not None:
        bq, bs = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
        fns[("q", "bnb")] = lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4")
        fns[("d", "bnb")] = lambda: F.dequantize_4bit(bq, bs)
    us = _best_us(fns, repeat=5)
    size = f"{shape[0]}x{shape[1]} bs64"
    nel = shape[0] * shape[1]
    for k, op in (("q", "quantize_4bit nf4"), ("d", "dequantize_4bit nf4")):
        rows += _pair(op, size, "float32", us[(k, "ours")], us.get((k, "bnb")), bytes_=nel * 4.5)

    n = 1_000_000 if small else 10_000_000
    p0 = torch.from_numpy((rng.standard_normal(n) * 0.1).astype(np.float32))
    g0 = torch.from_numpy((rng.standard_normal(n) * 0.01).astype(np.float32))
    makers = {"ours": O.AdamW8bit, "torch": torch.optim.AdamW}
    if bnb is not None:
        makers["bnb"] = bnb.optim.AdamW8bit
    fns = {}
    for label, make in makers.items():
        p = torch.nn.Parameter(p0.clone())
        p.grad = g0.clone()
        fns[label] = make([p]).step
    us = _best_us(fns, repeat=5)
    size = f"{n:.0e} params"
    rows += _pair("AdamW8bit step", size, "float32", us["ours"], us.get("bnb"), us["torch"],
                  bytes_=n * 14)
    rows.append(Row(SECTION, "AdamW step (torch, fp32 state)", size, "float32", "torch (CPU)",
                    us["torch"], bytes=n * 20))
    return rows


# --- layers and the model ------------------------------------------------------------------

_KINDS = ("int8", "int8-lt", "nf4", "fp4", "nf4 f32", "fp4 f32")
_LABEL = {"int8": "Linear8bitLt t0", "int8-lt": "Linear8bitLt t6", "nf4": "LinearNF4",
          "fp4": "LinearFP4", "nf4 f32": "LinearNF4 compute f32",
          "fp4 f32": "LinearFP4 compute f32"}
# the bitsandbytes layer each of ours is timed against. On a CPU with AVX512-BF16 both
# libraries' 4-bit layers compute float32 inference in bfloat16 by default (bitsandbytes
# whatever compute_dtype says); ours with compute_dtype=torch.float32 is the exact row
_BNB_KIND = {"nf4 f32": "nf4", "fp4 f32": "fp4"}


def _to_bnb(model, kind: str):
    """A copy of ``model`` with every nn.Linear replaced by bitsandbytes' layer of ``kind``,
    quantized on the CPU (the layer's ``.to("cpu")``)."""
    import torch
    import bitsandbytes as bnb
    model = copy.deepcopy(model)
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            has_bias = child.bias is not None
            if kind in ("int8", "int8-lt"):
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, has_bias,
                                          has_fp16_weights=False,
                                          threshold=6.0 if kind == "int8-lt" else 0.0)
            else:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, has_bias,
                                        compute_dtype=torch.float32, quant_type=kind)
            new.load_state_dict(child.state_dict())
            setattr(mod, child_name, new.to("cpu"))
    return model.eval()


def _ours(model, kind: str):
    import torch
    from torch_ops.replace import replace_linear
    model = copy.deepcopy(model)
    base, _, compute = kind.partition(" ")
    options = {"compute_dtype": torch.float32} if compute == "f32" else {}
    replace_linear(model, base, verbose=False, **options)
    return model.eval()


def layer_rows(sizes: str) -> list[Row]:
    """One layer forward per kind at MiniLM's two shapes, 32 x 12 tokens."""
    import torch
    bnb = _bnb()
    torch.manual_seed(0)
    rows = []
    for k_in, k_out in ((384, 1536),) if sizes == "small" else ((384, 1536), (1536, 384)):
        base = torch.nn.Sequential(torch.nn.Linear(k_in, k_out)).eval()
        x = torch.randn(32, 12, k_in)
        fns = {}
        for kind in _KINDS:
            fns[(kind, "ours")] = _ours(base, kind)
            if bnb is not None and kind not in _BNB_KIND:
                fns[(kind, "bnb")] = _to_bnb(base, kind)
        fns[("fp32", "torch")] = base
        with torch.inference_mode():
            us = _best_us({k: (lambda m=m: m(x)) for k, m in fns.items()},
                          repeat=2 if sizes == "small" else 15)
        size = f"{k_in}->{k_out} x 384 tok"
        for kind in _KINDS:
            rows += _pair(_LABEL[kind] + " forward", size, "float32", us[(kind, "ours")],
                          us.get((_BNB_KIND.get(kind, kind), "bnb")), us[("fp32", "torch")])
        rows.append(Row(SECTION, "nn.Linear forward", size, "float32", "torch (CPU)", us[("fp32", "torch")]))
    return rows + decode_rows(sizes)


def decode_rows(sizes: str) -> list[Row]:
    """One token (1 row) through a 4096 -> 4096 NF4 / FP4 layer, float32 x: the decoding case,
    where ours takes the fused few-row kernel (qkernels/fourbit/_cpu_gemv.py, AVX-512)."""
    import torch
    bnb = _bnb()
    n = 1024 if sizes == "small" else 4096
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(n, n, bias=False)).eval()
    x = torch.randn(1, n)
    fns = {("fp32", "torch"): base}
    for kind in ("nf4", "fp4"):
        fns[(kind, "ours")] = _ours(base, kind)
        if bnb is not None:
            fns[(kind, "bnb")] = _to_bnb(base, kind)
    with torch.inference_mode():
        us = _best_us({k: (lambda m=m: m(x)) for k, m in fns.items()}, repeat=3 if sizes == "small" else 15)
    rows = []
    for kind in ("nf4", "fp4"):
        rows += _pair(f"{_LABEL[kind]} forward, 1 token", f"{n}->{n}", "float32", us[(kind, "ours")],
                      us.get((kind, "bnb")), us[("fp32", "torch")], bytes_=n * n / 2 + 4 * n * n / 64)
    rows.append(Row(SECTION, "nn.Linear forward, 1 token", f"{n}->{n}", "float32", "torch (CPU)",
                    us[("fp32", "torch")], bytes=4 * n * n))
    return rows


class _Block(__import__("torch").nn.Module):
    """A BERT encoder layer's shapes, built without transformers (post-norm, GELU)."""

    def __init__(self, hidden: int, heads: int, inter: int):
        import torch.nn as nn
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.attn_out = nn.Linear(hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.intermediate = nn.Linear(hidden, inter)
        self.output = nn.Linear(inter, hidden)
        self.norm2 = nn.LayerNorm(hidden)

    def forward(self, h, mask):
        import torch.nn.functional as Fn
        B, T, H = h.shape

        def split(t):
            return t.view(B, T, self.heads, H // self.heads).transpose(1, 2)

        a = Fn.scaled_dot_product_attention(split(self.query(h)), split(self.key(h)),
                                            split(self.value(h)), attn_mask=mask)
        h = self.norm1(h + self.attn_out(a.transpose(1, 2).reshape(B, T, H)))
        return self.norm2(h + self.output(Fn.gelu(self.intermediate(h))))


class _Encoder(__import__("torch").nn.Module):
    def __init__(self, layers: int, vocab: int = 30522, hidden: int = 384, heads: int = 12,
                 inter: int = 1536):
        import torch.nn as nn
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(_Block(hidden, heads, inter) for _ in range(layers))

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        mask = attention_mask[:, None, None, :].bool()
        for b in self.blocks:
            h = b(h, mask)
        return h


def minilm_like(layers: int = 6):
    """(model, description): BertModel from a MiniLM-L6 config when transformers imports,
    else _Encoder; random weights (no download)."""
    import torch
    torch.manual_seed(0)
    try:
        from transformers import BertConfig, BertModel
        cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=layers,
                         num_attention_heads=12, intermediate_size=1536)
        return BertModel(cfg).eval(), f"BertModel {layers}x384/1536 (config)"
    except Exception:
        return _Encoder(layers).eval(), f"encoder {layers}x384/1536 (built here)"


def _batches(n_sentences: int, batch: int = 32, seed: int = 0):
    import torch
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n_sentences, batch):
        b = min(batch, n_sentences - start)
        lengths = torch.randint(8, 17, (b,), generator=g)
        T = int(lengths.max())
        ids = torch.randint(1000, 30000, (b, T), generator=g)
        mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
        out.append((ids * mask, mask))
    return out


def model_rows(sizes: str) -> list[Row]:
    import torch
    small = sizes == "small"
    model, desc = minilm_like(1 if small else 6)
    batches = _batches(16 if small else 200)
    bnb = _bnb()
    variants = {("fp32", "torch"): model}
    for kind in _KINDS:
        variants[(kind, "ours")] = _ours(model, kind)
        if bnb is not None and kind not in _BNB_KIND:
            variants[(kind, "bnb")] = _to_bnb(model, kind)

    def run(m):
        for ids, mask in batches:
            m(input_ids=ids, attention_mask=mask)

    best = {k: float("inf") for k in variants}
    with torch.inference_mode():
        for m in variants.values():  # warm-up (JIT compile / cache load, first-call setup)
            run(m)
        for _ in range(1 if small else 3):
            for k, m in variants.items():
                t0 = time.perf_counter()
                run(m)
                best[k] = min(best[k], time.perf_counter() - t0)
    us = {k: v * 1e6 for k, v in best.items()}
    n = sum(int(ids.shape[0]) for ids, _ in batches)
    size = f"{n} sent. b32 ({desc})"
    rows = []
    for kind in _KINDS:
        rows += _pair(f"model forward {kind}", size, "float32", us[(kind, "ours")],
                      us.get((_BNB_KIND.get(kind, kind), "bnb")), us[("fp32", "torch")])
    rows.append(Row(SECTION, "model forward fp32", size, "float32", "torch (CPU)", us[("fp32", "torch")]))
    return rows


def cpu_rows(sizes: str = "full") -> list[Row]:
    """The whole section: ops, layers, the model (see the module docstring)."""
    # bitsandbytes' int8 layer logs at every call that it casts float32 input to float16:
    # silenced, so that its times hold no logging
    log = logging.getLogger("bitsandbytes.autograd._functions")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return op_rows(sizes) + layer_rows(sizes) + model_rows(sizes)
    finally:
        log.setLevel(level)


gpu_rows = cpu_rows  # the section measures the host path on any machine
