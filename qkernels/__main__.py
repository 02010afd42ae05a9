"""Command line: ``python -m qkernels {demo,doctor,bench} ...``.

This entry point is glue above the library: ``demo`` lives in torch_ops (it trains torch
layers) and ``bench`` in the benchmarks package; both are imported only when asked for.
"""
from __future__ import annotations

import argparse
import sys

_COMMANDS = {
    "demo": "train and compress a small transformer in each quantized configuration (torch_ops.demo)",
    "doctor": "versions, devices, which backends load, a smoke test of each",
    "bench": "time the kernels and write tables and plots (benchmarks.run)",
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m qkernels",
                                     description="qkernels: quantization kernels for NumPy and PyTorch",
                                     epilog="\n".join(f"  {k:8s} {v}" for k, v in _COMMANDS.items()),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=list(_COMMANDS), help="what to run; COMMAND --help for its options")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] not in _COMMANDS:
        sys.stderr.write(f"python -m qkernels: error: unknown command {argv[0]!r}; "
                         f"choose from {', '.join(_COMMANDS)}\n")
        return 2
    command, rest = argv[0], argv[1:]
    if command == "doctor":
        from .doctor import doctor
        return doctor()
    if command == "demo":
        from torch_ops.demo import main as demo_main
        return demo_main(rest)
    try:
        from benchmarks.run import main as bench_main
    except ImportError:
        sys.stderr.write("python -m qkernels bench: the benchmarks package is not importable; "
                         "run it from a source checkout\n")
        return 2
    return bench_main(rest)


if __name__ == "__main__":
    sys.exit(main())
