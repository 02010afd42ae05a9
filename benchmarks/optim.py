"""Benchmark section "optim": one AdamW8bit step over 10 tensors of 4096 x 2560 (1.05e8
parameters, fp32 and bf16), beside torch.optim.AdamW(fused=True) and bitsandbytes'
AdamW8bit / PagedAdamW8bit. Bytes per parameter of an 8-bit step: p read + written, g
read, two 8-bit codes read + written (fp32: 16 B, bf16: 10 B) plus 16 B per 256-block.

"time" is our fused kernels alone (one launch per tensor) in a CUDA graph; "eager" is the
whole optimizer.step() from Python. Ratios compare eager step times (bitsandbytes and
torch are timed eagerly: bitsandbytes launches off torch's stream). The note gives the
optimizer state in bytes per parameter.
"""
from __future__ import annotations

import numpy as np

from .timing import Row, cpu_interleaved_us, cuda_graph_us, eager_us

SECTION = "optim"
SHAPES = {"small": (2, 4096, 2560), "full": (10, 4096, 2560)}


def _bnb():
    try:
        import bitsandbytes as bnb
        return bnb
    except Exception:
        return None


def _state_bytes_per_param(opt, params) -> float:
    import torch
    seen, total = set(), 0
    for p in params:
        for v in opt.state[p].values():
            if isinstance(v, torch.Tensor) and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                total += v.numel() * v.element_size()
    return total / sum(p.numel() for p in params)


def _params(count, rows, cols, dtype):
    import torch
    gen = torch.Generator(device="cuda").manual_seed(0)
    ps = []
    for _ in range(count):
        p = torch.nn.Parameter(torch.randn(rows, cols, device="cuda", generator=gen).to(dtype) * 0.1)
        p.grad = (torch.randn(rows, cols, device="cuda", generator=gen) * 0.01).to(dtype)
        ps.append(p)
    return ps


def gpu_rows(sizes: str = "full") -> list[Row]:
    import torch
    import qkernels
    from qkernels.optim import _cupy
    from torch_ops import optim as O
    count, rows_, cols = SHAPES[sizes]
    n = count * rows_ * cols
    bnb = _bnb()
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        es = torch.finfo(dtype).bits // 8
        nbytes = n * (3 * es + 4) + 16 * n / 256
        size = f"{count}x{rows_}x{cols}"
        eager = {}
        # ours: the fused kernels alone in a graph, and the optimizer step eagerly
        ps = _params(count, rows_, cols, dtype)
        opt = O.AdamW8bit(ps)
        opt.step()
        state_bpp = _state_bytes_per_param(opt, ps)

        def kernels(ps=ps, opt=opt, name=name):
            stream = torch.cuda.current_stream().cuda_stream
            from reference.optim import adam_scalars
            s = adam_scalars(1e-3, (0.9, 0.999), 1e-8, 1e-2, 2)
            for p in ps:
                st = opt.state[p]
                q1, q2 = opt._host_qmaps(st)
                _cupy.optimizer_update_8bit_blockwise(
                    p.data_ptr(), p.grad.data_ptr(), st["state1"].data_ptr(), st["state2"].data_ptr(),
                    st["absmax1"].data_ptr(), st["absmax2"].data_ptr(), qmap1=q1, qmap2=q2,
                    n=p.numel(), dtype=name, scalars=s, device=p.device.index, stream=stream)
        graph_us = cuda_graph_us([kernels])
        eager["cupy"] = eager_us([opt.step])
        results = {"cupy": (graph_us, eager["cupy"], state_bpp)}
        if "numba" in qkernels.available_backends():
            def numba_step(opt=opt):
                with qkernels.use_backend("numba"):
                    opt.step()
            eager["numba"] = eager_us([numba_step], rounds=3)
            results["numba"] = (None, eager["numba"], state_bpp)
        del opt, ps
        torch.cuda.empty_cache()
        others = {"torch AdamW fused": lambda ps: torch.optim.AdamW(ps, fused=True)}
        if bnb is not None:
            others["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps)
            others["bitsandbytes PagedAdamW8bit"] = lambda ps: bnb.optim.PagedAdamW8bit(ps)
        for label, make in others.items():
            ps = _params(count, rows_, cols, dtype)
            o = make(ps)
            o.step()
            t = eager_us([o.step])
            eager[label] = t
            results[label] = (None, t, _state_bytes_per_param(o, ps))
            del o, ps
            torch.cuda.empty_cache()
        for backend, (g_us, e_us, bpp) in results.items():
            row = Row(SECTION, "AdamW8bit step" if "torch" not in backend else "AdamW step", size,
                      name, backend, g_us if g_us is not None else e_us, e_us, bytes=nbytes,
                      note=f"state {bpp:.3f} B/param" + ("" if g_us is not None else "; eager"))
            if backend in ("cupy", "numba"):
                if "bitsandbytes AdamW8bit" in eager:
                    row.ratios["bnb"] = eager["bitsandbytes AdamW8bit"] / e_us
                row.ratios["torch"] = eager["torch AdamW fused"] / e_us
            out.append(row)
    return out + convergence_rows("cuda")


def cpu_rows(sizes: str = "full") -> list[Row]:
    """The reference AdamW8bit step (torch_ops.optim on CPU) over 1e7 fp32 parameters,
    beside bitsandbytes' CPU AdamW8bit and torch's AdamW, interleaved repeats."""
    import torch
    from torch_ops import optim as O
    n = 10_000_000 if sizes == "full" else 1_000_000
    rng = np.random.default_rng(0)
    p0 = torch.from_numpy((rng.standard_normal(n) * 0.1).astype(np.float32))
    g0 = torch.from_numpy((rng.standard_normal(n) * 0.01).astype(np.float32))
    makers = {"numpy (torch_ops.optim)": lambda ps: O.AdamW8bit(ps),
              "torch AdamW": lambda ps: torch.optim.AdamW(ps)}
    bnb = _bnb()
    if bnb is not None:
        makers["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps)
    fns = {}
    for label, make in makers.items():
        p = torch.nn.Parameter(p0.clone())
        p.grad = g0.clone()
        fns[label] = make([p]).step
    us = cpu_interleaved_us(fns, repeat=5)
    rows = []
    for label, t in us.items():
        row = Row(SECTION, "AdamW8bit step" if "torch AdamW" != label else "AdamW step",
                  f"{n:.0e}", "float32", label + " (CPU)", t, bytes=n * 16)
        if label.startswith("numpy"):
            if "bitsandbytes AdamW8bit" in us:
                row.ratios["bnb"] = us["bitsandbytes AdamW8bit"] / t
            row.ratios["torch"] = us["torch AdamW"] / t
        rows.append(row)
    return rows + convergence_rows("cpu")


def _char_model_loss(make, device: str, steps: int = 300, ctx: int = 4) -> float:
    """Mean loss over the last 30 of ``steps`` steps of a character-level MLP (embedding
    4096, 32768 and 32768-parameter layers: all 8-bit) trained on the source text of the
    standard library's json package (a real corpus every Python ships), batch 256, lr 3e-3."""
    import inspect
    import json.decoder
    import json.encoder
    import torch
    text = "".join(inspect.getsource(m) for m in (json.decoder, json.encoder))
    data = torch.tensor([min(ord(c), 127) for c in text], device=device)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(128, 32), torch.nn.Flatten(),
                                torch.nn.Linear(32 * ctx, 256), torch.nn.GELU(),
                                torch.nn.Linear(256, 128)).to(device)
    opt = make(model.parameters())
    gen = torch.Generator(device=device).manual_seed(1)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(data) - ctx - 1, (256,), generator=gen, device=device)
        x = torch.stack([data[idx + k] for k in range(ctx)], 1)
        loss = torch.nn.functional.cross_entropy(model(x), data[idx + ctx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return float(torch.stack(losses[-30:]).mean())


def convergence_rows(device: str) -> list[Row]:
    """AdamW8bit against torch.optim.AdamW, same hyper-parameters, same data (issue: final
    loss within 2%)."""
    import time
    import torch
    from torch_ops import optim as O
    t0 = time.perf_counter()
    base = _char_model_loss(lambda ps: torch.optim.AdamW(ps, lr=3e-3), device)
    t1 = time.perf_counter()
    ours = _char_model_loss(lambda ps: O.AdamW8bit(ps, lr=3e-3), device)
    t2 = time.perf_counter()
    note = (f"final loss {ours:.4f} vs torch AdamW {base:.4f} ({100 * (ours - base) / base:+.2f}%); "
            f"time = whole training step")
    return [Row(SECTION, "AdamW8bit convergence", "char-MLP 300 steps", "float32",
                "torch_ops" + (" (CPU)" if device == "cpu" else ""), (t2 - t1) / 300 * 1e6,
                note=note + f"; torch AdamW run {(t1 - t0) / 300 * 1e6:.0f} us/step")]
