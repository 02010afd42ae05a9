"""Benchmark section "decode": greedy token generation with a transformers LlamaForCausalLM
whose nn.Linear layers are ours (NF4 in bf16; LLM.int8() threshold 6 in fp16), bitsandbytes'
(Linear4bit NF4, Linear8bitLt threshold 6; where bitsandbytes imports) or torch's (bf16).

Model: Llama-3-8B layer shapes (hidden 4096, MLP 14336, 32 query / 8 key-value heads, vocab
32000), 8 decoder layers (2 at sizes "small"), random weights (seed 0), built on the GPU in
the configuration's dtype; every nn.Linear but lm_head is converted (ours by
``torch_ops.replace_linear``, bitsandbytes' by loading each nn.Linear's state_dict into its
layer and moving it to the GPU).

Generation, at batch 1 and 8 (each row its own random 32-token prompt, fixed seed): the
prompt's forward fills the KV cache and predicts the first token; then 64 decode steps (16
at "small"), each feeding the last token (argmax of the last logits) through the model's
forward with its KV cache and producing the next. Only the decode steps are timed (host
clock between two synchronizations; median of 3 generations after a warm-up one):
- eager: ``model(input_ids, position_ids, cache, use_cache=True)`` launched from Python,
  transformers' DynamicCache (what a plain call site gets);
- compiled: the step (forward + argmax) under ``torch.compile(mode="reduce-overhead",
  dynamic=False)`` with a transformers StaticCache (preallocated, static addresses, so the
  step can replay as a CUDA graph); the prompt's forward stays eager. The warm-up
  generation compiles and records; its time is in the note. A configuration that fails to
  compile gets a row saying so.

Per row: ``us`` = microseconds per decode step; the note has tokens/s (batch * steps /
decode time) and the GPU time per step: the device time (kernels, copies, memsets) of one
profiled generation's decode steps (torch.profiler) over the number of steps. A step whose
wall time is well above its GPU time is host bound. Bytes: the weights read once per step
(every parameter and quantization-state tensor but the embedding table; the KV cache is not
counted), so the rate is the effective weight bandwidth. Ratios: "bnb" = bitsandbytes' time
/ ours, "torch" = the bf16 model's time / ours, same mode and batch.

GPU only: ``cpu_rows`` returns no rows."""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import statistics
import sys
import time

from .timing import Row, bitsandbytes_or_none

SECTION = "decode"
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=32000)
LAYERS = {"small": 2, "full": 8}
NEW_TOKENS = {"small": 16, "full": 64}
PROMPT = 32
BATCHES = (1, 8)
REPEATS = 3  # timed generations per measurement (median)


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmarked model: its row name, dtype, layer family and whose layers."""
    name: str
    dtype: str    # "bfloat16" / "float16"
    family: str   # "plain", "nf4" or "int8"
    owner: str    # "torch", "ours" or "bnb"


CONFIGS = (
    Config("decode bf16 (torch)", "bfloat16", "plain", "torch"),
    Config("decode NF4 (ours)", "bfloat16", "nf4", "ours"),
    Config("decode NF4 (bnb)", "bfloat16", "nf4", "bnb"),
    Config("decode int8 t=6 (ours)", "float16", "int8", "ours"),
    Config("decode int8 t=6 (bnb)", "float16", "int8", "bnb"),
)



# -- the model --------------------------------------------------------------------------------
def llama_config(layers: int, **shape):
    """A LlamaConfig with Llama-3-8B layer shapes (``shape`` overrides them, for tests)."""
    from transformers import LlamaConfig
    return LlamaConfig(**{**LLAMA3_8B, **shape}, num_hidden_layers=layers,
                       attn_implementation="sdpa")


@contextlib.contextmanager
def _default_dtype(dtype):
    import torch
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build_model(config, dtype, device):
    """A LlamaForCausalLM with random weights (seed 0), created in ``dtype`` on ``device``."""
    import torch
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    with _default_dtype(dtype), torch.device(device):
        model = LlamaForCausalLM(config)
    return model.eval()


def _bnb_replace(model, family: str) -> None:
    """Every nn.Linear but lm_head -> bitsandbytes' Linear4bit NF4 (bf16 compute) or
    Linear8bitLt (threshold 6), weights copied through the state_dict, then moved to the
    model's device (where bitsandbytes quantizes)."""
    import torch
    bnb = bitsandbytes_or_none()
    if bnb is None:
        raise ImportError("bitsandbytes is not importable")
    names = [n for n, m in model.named_modules()
             if type(m) is torch.nn.Linear and n.split(".")[-1] != "lm_head"]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        bias = old.bias is not None
        if family == "nf4":
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=bias,
                                    compute_dtype=torch.bfloat16, compress_statistics=True,
                                    quant_type="nf4")
        else:
            new = bnb.nn.Linear8bitLt(old.in_features, old.out_features, bias=bias,
                                      has_fp16_weights=False, threshold=6.0)
        new.load_state_dict({k: v.cpu() for k, v in old.state_dict().items()})
        setattr(parent, child, new.to(old.weight.device).eval())
        del old


def convert(model, config: Config) -> None:
    """Put ``config``'s layers into ``model`` in place (nothing for the plain model)."""
    from torch_ops import replace_linear
    if config.owner == "bnb":
        _bnb_replace(model, config.family)
    elif config.family == "nf4":
        replace_linear(model, "nf4", skip=("lm_head",), verbose=False)
    elif config.family == "int8":
        replace_linear(model, "int8", skip=("lm_head",), verbose=False, threshold=6.0)


def weight_bytes(model) -> int:
    """Bytes of the parameters and their quantization state (absmax, nested absmax, SCB; ours
    or bitsandbytes') read by one decode step: all but the embedding table."""
    emb = model.get_input_embeddings().weight
    seen, total = {emb.data_ptr()}, 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        nested = getattr(state, "state2", None)
        for t in (p, getattr(state, "absmax", None), getattr(nested, "absmax", None),
                  getattr(p, "SCB", None)):
            if t is not None and t.numel() and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


# -- generation -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ForwardApi:
    """How this transformers version's forward takes the KV cache: by ``cache`` (5.x later
    releases) or ``past_key_values``; whether it still takes ``cache_position``."""
    cache_arg: str
    cache_position: bool

    @classmethod
    def of(cls, model) -> "ForwardApi":
        params = inspect.signature(model.forward).parameters
        return cls("cache" if "cache" in params else "past_key_values", "cache_position" in params)

    def kwargs(self, cache, positions) -> dict:
        """Forward keywords for tokens at ``positions`` ((1, q) long)."""
        kw = {"position_ids": positions, self.cache_arg: cache, "use_cache": True}
        if self.cache_position:
            kw["cache_position"] = positions[0]
        return kw


def dynamic_cache(model):
    from transformers import DynamicCache
    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def static_cache(model, batch: int, max_len: int):
    """A StaticCache for ``batch`` rows of ``max_len`` tokens (5.x allocates it lazily on the
    first update; older releases want the batch, device and dtype up front)."""
    from transformers import StaticCache
    param = next(model.parameters())
    dtype = model.get_input_embeddings().weight.dtype
    try:
        return StaticCache(config=model.config, max_cache_len=max_len, max_batch_size=batch,
                           device=param.device, dtype=dtype)
    except TypeError:
        return StaticCache(config=model.config, max_cache_len=max_len)


def _step(model, api: ForwardApi, cache, token, positions):
    """One decode step: the next token (batch, 1) after ``token`` (batch, 1)."""
    logits = model(input_ids=token, **api.kwargs(cache, positions)).logits
    return logits[:, -1].argmax(-1, keepdim=True)


def prompts(batch: int, vocab: int, device, length: int = PROMPT, seed: int = 0):
    """(batch, length) random token ids, the same for every configuration."""
    import torch
    g = torch.Generator().manual_seed(seed + batch)
    return torch.randint(0, vocab, (batch, length), generator=g).to(device)


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Decoder:
    """Greedy generation of ``steps`` tokens after ``prompt`` (batch, P), eager (a fresh
    DynamicCache per generation) or compiled (one StaticCache, reset per generation; the
    step compiled with ``compile_options``)."""

    def __init__(self, model, prompt, steps: int, compiled: bool = False, compile_options=None):
        import torch
        self.model, self.prompt, self.steps, self.compiled = model, prompt, steps, compiled
        self.device = prompt.device
        self.api = ForwardApi.of(model)
        p = prompt.shape[1]
        self.prompt_positions = torch.arange(p, device=self.device)[None]
        self.positions = torch.arange(p, p + steps, device=self.device).view(steps, 1, 1)
        if compiled:
            options = {"mode": "reduce-overhead", "dynamic": False, **(compile_options or {})}
            self.cache = static_cache(model, prompt.shape[0], p + steps)
            self.step = torch.compile(_step, **options)
        else:
            self.cache = None
            self.step = _step

    def prefill(self):
        """The prompt's forward (eager): a filled cache and the first token."""
        if self.compiled:
            cache = self.cache
            cache.reset()
        else:
            cache = dynamic_cache(self.model)
        logits = self.model(input_ids=self.prompt,
                            **self.api.kwargs(cache, self.prompt_positions)).logits
        return cache, logits[:, -1].argmax(-1, keepdim=True)

    def decode(self, cache, token) -> list:
        """The decode steps; the tokens they produced."""
        import torch
        out = []
        for i in range(self.steps):
            if self.compiled:
                torch.compiler.cudagraph_mark_step_begin()
                token = self.step(self.model, self.api, cache, token, self.positions[i]).clone()
            else:
                token = self.step(self.model, self.api, cache, token, self.positions[i])
            out.append(token)
        return out

    def generate(self):
        """(tokens (batch, steps), seconds spent in the decode steps)."""
        import torch
        with torch.no_grad():
            cache, token = self.prefill()
            _sync(self.device)
            t0 = time.perf_counter()
            tokens = self.decode(cache, token)
            _sync(self.device)
            seconds = time.perf_counter() - t0
        return torch.cat(tokens, dim=1), seconds

    def gpu_seconds(self) -> float:
        """Device time of one generation's decode steps (torch.profiler; the prompt's forward
        is outside the profile)."""
        import torch
        from torch.profiler import ProfilerActivity, profile
        with torch.no_grad():
            cache, token = self.prefill()
            _sync(self.device)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                self.decode(cache, token)
                _sync(self.device)
        return _device_us(prof.events()) / 1e6


def _device_us(events) -> float:
    """Sum of the self time of the device events (kernels, copies, memsets) in microseconds,
    user annotations (ranges spanning kernels) left out."""
    from torch.autograd import DeviceType
    return sum(e.self_device_time_total for e in events
               if e.device_type == DeviceType.CUDA and not e.is_user_annotation)


# -- measurement ------------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    us: float                 # per decode step
    tokens_per_s: float
    gpu_ms: float | None      # device time per decode step
    warmup_s: float           # the warm-up generation (compile + CUDA graph recording)
    note: str = ""


def measure(model, prompt, steps: int, compiled: bool, profile: bool = True,
            repeats: int = REPEATS, compile_options=None) -> Result:
    """Warm-up generation, then the median of ``repeats`` timed ones, then a profiled one."""
    dec = Decoder(model, prompt, steps, compiled, compile_options)
    t0 = time.perf_counter()
    dec.generate()
    warmup = time.perf_counter() - t0
    seconds = statistics.median(dec.generate()[1] for _ in range(repeats))
    gpu_ms = dec.gpu_seconds() * 1e3 / steps if profile else None
    return Result(seconds * 1e6 / steps, prompt.shape[0] * steps / seconds, gpu_ms, warmup)


def _compile_counts() -> str:
    """Graph breaks and CUDA-graph skips counted by dynamo / inductor since the last reset."""
    from torch._dynamo.utils import counters
    breaks = sum(counters["graph_break"].values())
    skips = sum(v for k, v in counters["inductor"].items() if "cudagraph_skips" in k)
    parts = [f"{breaks} graph breaks"] if breaks else []
    return ", ".join(parts + (["cudagraphs skipped"] if skips else []))


def measure_compiled(model, prompt, steps: int, **kw) -> Result:
    """``measure(compiled=True)`` with dynamo reset before (fresh compile and CUDA graph
    pools); a failure becomes a Result with a NaN time and the note."""
    import torch
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    try:
        res = measure(model, prompt, steps, True, **kw)
    except Exception as e:  # recorded, not fatal
        torch._dynamo.reset()
        return Result(math.nan, math.nan, None, 0.0, f"compile failed: {_short(e)}")
    counts = _compile_counts()
    res.note = f"compile+warm-up {res.warmup_s:.1f} s" + (f", {counts}" if counts else "")
    return res


def _short(e: BaseException) -> str:
    """``ExceptionName: <the first 80 characters of its message's first line>``."""
    message = str(e).strip()
    return f"{type(e).__name__}: {message.splitlines()[0][:80] if message else ''}"


def _row(config: Config, size: str, backend: str, res: Result, nbytes: float,
         eager_us: float | None) -> Row:
    note = [] if math.isnan(res.us) else [f"{res.tokens_per_s:.0f} tok/s"]
    if res.gpu_ms is not None:
        note.append(f"gpu {res.gpu_ms:.2f} ms/step" if res.gpu_ms else "gpu n/a")
    if res.note:
        note.append(res.note)
    return Row(SECTION, config.name, size, config.dtype, backend, res.us, eager_us,
               bytes=0.0 if math.isnan(res.us) else nbytes, note=", ".join(note))


def config_rows(config: Config, layers: int, steps: int, device="cuda", shape=None,
                batches=BATCHES, compile_options=None) -> list[Row]:
    """Eager and compiled rows of one configuration at each batch; the model is freed after."""
    import torch
    dtype = getattr(torch, config.dtype)
    model = build_model(llama_config(layers, **(shape or {})), dtype, device)
    rows = []
    try:
        convert(model, config)
        nbytes = weight_bytes(model)
        vocab = model.config.vocab_size
        for batch in batches:
            size = f"{layers}L b{batch}"
            prompt = prompts(batch, vocab, device)
            try:
                eager = measure(model, prompt, steps, False, profile=device != "cpu")
            except Exception as e:  # this batch is lost, not the configuration
                rows.append(Row(SECTION, config.name, size, config.dtype, "eager", math.nan,
                                note=f"failed: {_short(e)}"))
                _progress(rows[-1])
                continue
            rows.append(_row(config, size, "eager", eager, nbytes, eager.us))
            _progress(rows[-1])
            comp = measure_compiled(model, prompt, steps, profile=device != "cpu",
                                    compile_options=compile_options)
            rows.append(_row(config, size, "compiled", comp, nbytes, eager.us))
            _progress(rows[-1])
    finally:
        del model
        _free(device)
    return rows


def _free(device) -> None:
    import gc

    import torch
    torch._dynamo.reset()
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _progress(row: Row) -> None:
    print(f"  decode: {row.op} {row.size} {row.backend}: {row.us / 1e3:.2f} ms/step, {row.note}",
          file=sys.stderr, flush=True)


def add_ratios(rows: list[Row]) -> None:
    """Ours against bitsandbytes (same family) and the bf16 plain model, same mode and size."""
    by_key = {}
    for cfg in CONFIGS:
        for r in rows:
            if r.op == cfg.name:
                by_key[(cfg.family, cfg.owner, r.backend, r.size)] = r
    for (family, owner, backend, size), r in by_key.items():
        if owner != "ours" or math.isnan(r.us):
            continue
        for name, other in (("bnb", by_key.get((family, "bnb", backend, size))),
                            ("torch", by_key.get(("plain", "torch", backend, size)))):
            if other is not None and not math.isnan(other.us):
                r.ratios[name] = other.us / r.us


def gpu_rows(sizes: str = "full") -> list[Row]:
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"decode: skipped, transformers is not importable ({e})", file=sys.stderr)
        return []
    layers, steps = LAYERS[sizes], NEW_TOKENS[sizes]
    rows = []
    for config in CONFIGS:
        if config.owner == "bnb" and bitsandbytes_or_none() is None:
            continue
        try:
            rows += config_rows(config, layers, steps)
        except Exception as e:  # one configuration's failure does not lose the others
            rows.append(Row(SECTION, config.name, f"{layers}L", config.dtype, "eager", math.nan,
                            note=f"failed: {_short(e)}"))
            _free("cuda")
    add_ratios(rows)
    return rows


def cpu_rows(sizes: str = "full") -> list[Row]:
    """None: the decode benchmark runs on the GPU only."""
    return []
