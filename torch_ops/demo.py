"""``qkernels demo``: train a small character-level transformer on English text that
ships with Python (``pydoc_data.topics``) in several quantized configurations side by side,
then compress the trained baseline for inference, and print one table.

Configurations: fp32 ``nn.Linear`` + ``torch.optim.AdamW`` (the baseline), ``SwitchBackLinear``
+ ``AdamW8bit``, ``LinearFP8Mixed`` + ``Adam8bit``; then the trained baseline converted with
``replace_linear`` to ``Linear8bitLt`` and to ``LinearNF4`` and evaluated. The embedding and
the output head stay in full precision in every configuration (the usual practice).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# --- data -------------------------------------------------------------------------------


def load_text() -> str:
    """The pydoc topics: ~1 MB of English prose and Python examples, no download."""
    from pydoc_data.topics import topics
    return "\n".join(topics[k] for k in sorted(topics))


class CharData:
    """Character-level tokens split 90/10 into train and held-out parts."""

    def __init__(self, text: str, seed: int = 0):
        chars = sorted(set(text))
        self.vocab = len(chars)
        index = {c: i for i, c in enumerate(chars)}
        data = torch.tensor([index[c] for c in text], dtype=torch.long)
        split = int(0.9 * len(data))
        self.train, self.held_out = data[:split], data[split:]
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, part: str, batch: int, seq: int, gen=None):
        data = self.train if part == "train" else self.held_out
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen or self.gen)
        x = torch.stack([data[s:s + seq] for s in starts])
        y = torch.stack([data[s + 1:s + seq + 1] for s in starts])
        return x, y


# --- model ------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, d: int, heads: int, linear):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = linear(d, 3 * d), linear(d, d)
        self.fc, self.out = linear(d, 4 * d), linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharLM(nn.Module):
    """A GPT-style decoder over characters; ``linear`` builds every Linear inside the blocks."""

    def __init__(self, vocab: int, d: int = 128, layers: int = 2, heads: int = 4, seq: int = 64,
                 linear=nn.Linear):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads, linear) for _ in range(layers))
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# --- the run ----------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    name: str
    held_out_loss: float
    weight_bytes: int
    state_bytes: int | None
    step_ms: float | None
    curve: list = dataclasses.field(default_factory=list)
    first_loss: float | None = None

    @property
    def perplexity(self) -> float:
        return math.exp(self.held_out_loss)


def _progress(label: str, i: int, total: int, loss: float) -> None:
    width = 30
    done = int(width * i / total)
    sys.stderr.write(f"\r  {label:<28} [{'#' * done}{'.' * (width - done)}] {i}/{total} loss {loss:.3f}")
    if i == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer inside the transformer blocks (the quantized part)."""
    total = 0
    for block in model.blocks:
        for t in list(block.parameters()) + list(block.buffers()):
            if block.ln1.weight is t or block.ln1.bias is t or block.ln2.weight is t or block.ln2.bias is t:
                continue
            total += t.numel() * t.element_size()
    return total


def optimizer_state_bytes(opt) -> int:
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


@torch.no_grad()
def evaluate(model, data: CharData, cfg) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(1234)  # the same held-out batches for every model
    losses = []
    for _ in range(cfg.eval_batches):
        x, y = data.batch("held_out", cfg.batch, cfg.seq, gen)
        x, y = x.to(cfg.device), y.to(cfg.device)
        logits = model(x)
        losses.append(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1)).item())
    model.train()
    return statistics.mean(losses)


def train_step(model, opt, x, y) -> torch.Tensor:
    """One optimizer step on next-character cross-entropy; returns the loss (no host sync)."""
    logits = model(x)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def train(name: str, model, opt, data: CharData, cfg) -> Result:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    curve, times = [], []
    for step in range(1, cfg.steps + 1):
        x, y = data.batch("train", cfg.batch, cfg.seq, gen)
        x, y = x.to(cfg.device), y.to(cfg.device)
        t0 = time.perf_counter()
        loss = train_step(model, opt, x, y)
        if cfg.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        curve.append(loss.item())
        if step % max(1, cfg.steps // 30) == 0 or step == cfg.steps:
            _progress(name, step, cfg.steps, statistics.mean(curve[-10:]))
    return Result(name, evaluate(model, data, cfg), linear_weight_bytes(model),
                  optimizer_state_bytes(opt), 1e3 * statistics.median(times[1:] or times),
                  curve, first_loss=statistics.mean(curve[:5]))


def run(cfg) -> list[Result]:
    from torch_ops.optim import Adam8bit, AdamW8bit
    from torch_ops.fp8 import LinearFP8Mixed
    from torch_ops.switchback import SwitchBackLinear
    from torch_ops.replace import replace_linear

    data = CharData(load_text(), cfg.seed)
    dev = cfg.device

    def model_with(linear):
        torch.manual_seed(cfg.seed)
        return CharLM(data.vocab, cfg.d, cfg.layers, cfg.heads, cfg.seq, linear).to(dev)

    lr, wd = cfg.lr, 0.01
    results = []
    base = model_with(nn.Linear)
    results.append(train("fp32 Linear + AdamW", base,
                         torch.optim.AdamW(base.parameters(), lr=lr, weight_decay=wd), data, cfg))
    sb = model_with(lambda i, o: SwitchBackLinear(i, o, device=dev))
    results.append(train("SwitchBack + AdamW8bit", sb, AdamW8bit(sb.parameters(), lr=lr, weight_decay=wd),
                         data, cfg))
    fp8 = model_with(lambda i, o: LinearFP8Mixed(i, o).to(dev))
    results.append(train("LinearFP8Mixed + Adam8bit", fp8, Adam8bit(fp8.parameters(), lr=lr), data, cfg))
    for kind, label in (("int8", "baseline -> Linear8bitLt"), ("nf4", "baseline -> LinearNF4")):
        converted = model_with(nn.Linear)
        converted.load_state_dict(base.state_dict())
        replace_linear(converted, kind, skip=("lm_head",), progress=False)
        converted.to(dev)
        results.append(Result(label, evaluate(converted, data, cfg), linear_weight_bytes(converted),
                              None, None))
    return results


def format_table(results: list[Result], backend: str) -> str:
    base = results[0]
    lines = ["| configuration | held-out loss | perplexity | vs baseline | block weights | "
             "optimizer state | step (ms) | backend |", "|" + "---|" * 8]
    for r in results:
        state = "-" if r.state_bytes is None else f"{r.state_bytes / 1024:.0f} KiB"
        step = "-" if r.step_ms is None else f"{r.step_ms:.1f}"
        lines.append(f"| {r.name} | {r.held_out_loss:.4f} | {r.perplexity:.2f} | "
                     f"{100 * (r.held_out_loss / base.held_out_loss - 1):+.2f}% | "
                     f"{r.weight_bytes / 1024:.0f} KiB | {state} | {step} | {backend} |")
    return "\n".join(lines)


def plot(results: list[Result], path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        if r.curve:
            k = max(1, len(r.curve) // 50)
            smooth = [statistics.mean(r.curve[max(0, i - k):i + 1]) for i in range(len(r.curve))]
            ax.plot(range(1, len(smooth) + 1), smooth, label=r.name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/char)")
    ax.set_title("qkernels demo: char-level transformer on pydoc topics")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line and exit 2, no usage dump
        sys.stderr.write(f"qkernels demo: error: {message}\n")
        sys.exit(2)


_HELP = """\
Train a small character-level transformer on English text that ships with
Python (pydoc_data.topics) in several quantized configurations side by side
(fp32 Linear + AdamW, SwitchBackLinear + AdamW8bit, LinearFP8Mixed +
Adam8bit), then convert the trained baseline to Linear8bitLt and LinearNF4 for
inference, and print one table. Writes demo.md, demo.json and a loss plot
(demo_loss.png, when matplotlib is installed) to OUT."""


def parse_args(argv):
    p = _Parser(prog="qkernels demo", description=_HELP,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per configuration (default 200 on CPU, 600 on a GPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to train (default: cuda when a GPU is visible)")
    p.add_argument("--backend", choices=("auto", "numpy", "cpu", "cupy", "numba"), default="auto",
                   help="qkernels backend for the quantized ops (default: fastest for the device)")
    p.add_argument("--out", default="demo_out", help="folder for the table and the loss plot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the CI test's size
    return p, p.parse_args(argv)


@dataclasses.dataclass
class Config:
    device: torch.device
    steps: int
    seed: int = 0
    d: int = 128
    layers: int = 2
    heads: int = 4
    seq: int = 64
    batch: int = 32
    lr: float = 3e-3
    eval_batches: int = 20


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be a positive integer; got {args.steps}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False)")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          (args.device if args.device != "auto" else "cpu"))
    try:
        os.makedirs(args.out, exist_ok=True)
        probe = os.path.join(args.out, ".write_test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as exc:
        parser.error(f"--out {args.out!r} is not writable ({exc.strerror or exc})")
    import qkernels
    backend = args.backend
    if backend != "auto" and backend not in qkernels.available_backends():
        parser.error(f"--backend {backend}: not available here ({qkernels.backend_status(backend)[1]})")
    if backend == "auto":
        from qkernels._backend import HOST_BACKENDS
        usable = qkernels.available_backends()  # fastest first
        backend = ([b for b in usable if b in HOST_BACKENDS] if device.type == "cpu" else usable)[0]
    big = device.type == "cuda"
    cfg = Config(device=device, steps=args.steps or (600 if big else 200), seed=args.seed)
    if big:
        cfg.d, cfg.layers, cfg.heads, cfg.seq, cfg.batch = 384, 4, 6, 128, 64
    if args.tiny:
        cfg.d, cfg.layers, cfg.heads, cfg.seq, cfg.batch, cfg.eval_batches = 32, 1, 2, 32, 8, 4
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.perf_counter()
    print(f"qkernels demo: {cfg.steps} steps per configuration on {device} (backend {backend})")
    with qkernels.use_backend(backend):
        results = run(cfg)
    table = format_table(results, backend)
    wall = time.perf_counter() - t0
    print()
    print(table)
    print(f"\nwall time {wall:.0f} s")
    with open(os.path.join(args.out, "demo.md"), "w") as f:
        f.write(f"# qkernels demo on {device}\n\n{table}\n\nwall time {wall:.0f} s\n")
    with open(os.path.join(args.out, "demo.json"), "w") as f:  # the same numbers, with the curves
        json.dump({"device": str(device), "backend": backend, "steps": cfg.steps, "wall_s": wall,
                   "results": [dataclasses.asdict(r) for r in results]}, f)
    png = plot(results, os.path.join(args.out, "demo_loss.png"))
    print(f"table: {os.path.join(args.out, 'demo.md')} (numbers and loss curves: demo.json); "
          f"plot: {png or '(matplotlib not installed)'}")
    return 0
