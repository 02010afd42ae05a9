"""Command line: ``python -m qkernels doctor``."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qkernels",
                                     description="qkernels: quantization kernels for NumPy and PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="versions, devices, backends and a smoke test of each")
    bench = sub.add_parser("bench", help="time the kernels (see benchmarks/)")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for benchmarks.run")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        from .doctor import doctor
        return doctor()
    if args.command == "bench":
        try:
            from benchmarks.run import main as bench_main
        except ImportError:
            print("error: the benchmarks package is not importable; run from a source checkout",
                  file=sys.stderr)
            return 2
        return bench_main(args.rest)
    return 2


if __name__ == "__main__":
    sys.exit(main())
