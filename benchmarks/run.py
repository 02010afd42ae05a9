"""The benchmark runner: ``python -m benchmarks [--ops blockwise,...] [--sizes small|full]
[--device cuda|cpu] [--out DIR]``.

Each section module (benchmarks/<family>.py) provides ``gpu_rows(sizes)`` and
``cpu_rows(sizes)`` returning timing.Row lists. The runner measures the device's ceilings
once (copy bandwidth; bf16 cuBLAS rate), prints one markdown table per section with
achieved GB/s or TFLOP/s, the percentage of the ceiling and the ratios to bitsandbytes and
torch measured in the same run, and writes it to ``<out>/<device>.md`` with the date and
commit.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import pathlib
import subprocess
import sys
import textwrap

from . import timing

SECTIONS = {  # name -> module; a section whose module is missing is reported, not fatal
    "blockwise": "benchmarks.blockwise",
    "fourbit": "benchmarks.fourbit",
    "int8": "benchmarks.int8",
    "fp8": "benchmarks.fp8",
    "optim": "benchmarks.optim",
    "layers": "benchmarks.layers",
    "layers4bit8bit": "benchmarks.layers4bit8bit",
    "host_path": "benchmarks.hostpath",
    "decode": "benchmarks.decode",
    "cpu": "benchmarks.cpu",  # the host path beside bitsandbytes' CPU backend, any device
}


def _commit() -> str:
    """HEAD's short hash, with "+ local changes" when tracked files differ from it."""
    here = pathlib.Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=here).stdout.strip() or "?"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=here).stdout.strip()
    except OSError:
        return "?"
    return head + (" + local changes" if dirty else "")


def format_table(rows: list[timing.Row], copy_gbps: float | None, gemm_tflops: float | None) -> str:
    head = ("| op | size | dtype | backend | time (us) | eager (us) | rate | % of ceiling "
            "| vs bnb | vs torch | note |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        if r.flops:
            rate, pct = f"{r.tflops:.0f} TFLOP/s", (r.tflops / gemm_tflops if gemm_tflops else None)
        elif r.bytes:
            rate, pct = f"{r.gbps:.0f} GB/s", (r.gbps / copy_gbps if copy_gbps else None)
        else:
            rate, pct = "", None
        ratio = lambda k: f"{r.ratios[k]:.2f}x" if k in r.ratios else ""  # noqa: E731
        lines.append(f"| {r.op} | {r.size} | {r.dtype} | {r.backend} | {r.us:.1f} | "
                     f"{'' if r.eager_us is None else f'{r.eager_us:.1f}'} | {rate} | "
                     f"{'' if pct is None else f'{100 * pct:.0f}%'} | {ratio('bnb')} | "
                     f"{ratio('torch')} | {r.note} |")
    return "\n".join(lines)


def plot_section(section: str, rows: list[timing.Row], ceiling_gbps: float | None,
                 ceiling_tflops: float | None, path: pathlib.Path) -> pathlib.Path | None:
    """One PNG per section: achieved rate against size, a subplot per (op, dtype), a line per
    backend, the measured ceiling drawn in. None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = list(dict.fromkeys((r.op, r.dtype) for r in rows))
    if not panels:
        return None
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.4 * nrows), squeeze=False)
    for ax, (op, dtype) in zip(axes.flat, panels):
        mine = [r for r in rows if (r.op, r.dtype) == (op, dtype)]
        sizes = list(dict.fromkeys(r.size for r in mine))
        flops = any(r.flops for r in mine)
        for backend in dict.fromkeys(r.backend for r in mine):
            pts = [(sizes.index(r.size), r.tflops if flops else r.gbps) for r in mine if r.backend == backend]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend)
        ceiling = ceiling_tflops if flops else ceiling_gbps
        if ceiling:
            ax.axhline(ceiling, color="gray", linestyle="--", label="measured ceiling")
        ax.set_xticks(range(len(sizes)), sizes, rotation=20, fontsize=7)
        ax.set_ylabel("TFLOP/s" if flops else "GB/s")
        ax.set_title(f"{op} ({dtype})", fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


_HELP = """\
Time each section's ops per backend (on a GPU: the median per call of a CUDA
graph over 4 rotated inputs), beside bitsandbytes and torch measured in the
same run, and against the device's measured ceilings (copy bandwidth, bf16
cuBLAS rate). Prints one markdown table per section and writes them, with the
date and commit, to DIR/<device>.md, plus one PNG per section when matplotlib
is installed."""


def main(argv=None) -> int:
    sections = textwrap.fill(", ".join(SECTIONS), width=76, initial_indent="  ",
                             subsequent_indent="  ", break_long_words=False, break_on_hyphens=False)
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=_HELP,
                                epilog=f"sections (for --ops):\n{sections}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", metavar="SECTION[,SECTION...]", default=",".join(SECTIONS),
                   help="comma-separated sections to run (default: all, listed below)")
    p.add_argument("--sizes", choices=("small", "full"), default="full",
                   help="problem sizes (default: full)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when a GPU is present, else cpu")
    p.add_argument("--out", metavar="DIR", default=str(pathlib.Path(__file__).parent / "results"),
                   help="folder for the tables and plots (default: benchmarks/results)")
    args = p.parse_args(argv)
    unknown = [s for s in args.ops.split(",") if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible")
    if device == "cuda":
        name = torch.cuda.get_device_name()
        copy_gbps, gemm_tflops = timing.copy_ceiling_gbps(), timing.gemm_ceiling_tflops()
        ceilings = f"copy {copy_gbps:.0f} GB/s (read + write), bf16 cuBLAS {gemm_tflops:.0f} TFLOP/s"
    else:
        import os
        name = f"CPU, {os.cpu_count()} cores"
        copy_gbps = gemm_tflops = None
        ceilings = "n/a (CPU)"
    slug = name.lower().replace("nvidia ", "").replace(" ", "-").replace(",", "")
    pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
    out = [f"# Benchmarks on {name}", "",
           f"{datetime.date.today().isoformat()}, commit {_commit()}, sizes {args.sizes}. "
           f"Ceilings measured in this run: {ceilings}. GPU times are the median per call of a "
           f"CUDA graph over 4 rotated inputs; 'eager' is the same call launched from Python.", ""]
    for section in args.ops.split(","):
        try:
            module = importlib.import_module(SECTIONS[section])
        except ImportError as exc:
            out += [f"## {section}", "", f"(not available: {exc})", ""]
            continue
        rows = (module.gpu_rows if device == "cuda" else module.cpu_rows)(args.sizes)
        out += [f"## {section}", "", format_table(rows, copy_gbps, gemm_tflops), ""]
        print("\n".join(out[-3:]), flush=True)
        png = plot_section(section, rows, copy_gbps, gemm_tflops,
                           pathlib.Path(args.out) / f"{slug}-{section}.png")
        if png:
            out.insert(len(out) - 1, f"\n![{section}]({png.name})")
    text = "\n".join(out)
    path = pathlib.Path(args.out) / f"{slug}.md"
    path.write_text(text + "\n")
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
