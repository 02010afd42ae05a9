"""The ``qkernels`` command (the installed console script; ``python -m torch_ops`` is the same
without the script): ``qkernels {demo,doctor} [options]``.

It lives in torch_ops, the top layer of the installed package, because it runs what lies
below it: ``doctor`` is qkernels.doctor and ``demo`` is torch_ops.demo, each imported only
when asked for. The benchmarks are not a command: the ``benchmarks`` package sits above
torch_ops in the source tree and is not in the wheel, so ``qkernels bench`` exits 2 with one
line saying to run ``python -m benchmarks`` from a source checkout.

Help texts are written as plain text for argparse.RawDescriptionHelpFormatter (no markup).
"""
from __future__ import annotations

import argparse
import sys

_COMMANDS = {
    "demo": "train and compress a small transformer in each quantized configuration",
    "doctor": "versions, devices, which backends load, and a smoke test of each",
}

_DOCTOR_HELP = """\
Print the versions of qkernels and its dependencies, the CUDA devices, which
backends load (and why the others do not), and a smoke test of each backend
that loads, compared with the NumPy reference.

Exit status: 0 when every smoke test passes, 1 otherwise."""


def _help(prog: str) -> str:
    lines = [f"usage: {prog} COMMAND [options]", "",
             "qkernels: bitsandbytes-class quantization for NumPy and PyTorch.", "",
             "commands:"]
    lines += [f"  {name:8s} {text}" for name, text in _COMMANDS.items()]
    lines += ["", f'Run "{prog} COMMAND --help" for the options of a command.',
              "The benchmarks are not installed with the package; from a source",
              "checkout's root run: python -m benchmarks --help"]
    return "\n".join(lines) + "\n"


def _doctor(prog: str, argv: list) -> int:
    parser = argparse.ArgumentParser(prog=f"{prog} doctor", description=_DOCTOR_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    from qkernels.doctor import doctor
    return doctor()


def main(argv=None, prog: str = "qkernels") -> int:
    """Run ``prog COMMAND [options]``; returns the exit status (2 for a usage error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        (sys.stdout if argv else sys.stderr).write(_help(prog))
        return 0 if argv else 2
    if argv[0] == "--version":
        from qkernels import __version__
        print(f"qkernels {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "bench":  # the former subcommand: say where the benchmarks are
        sys.stderr.write(f"{prog} bench: the benchmarks are not installed with the package; "
                         f"from a source checkout's root run: python -m benchmarks\n")
        return 2
    if command not in _COMMANDS:
        sys.stderr.write(f"{prog}: error: unknown command {command!r}; "
                         f"choose from {', '.join(_COMMANDS)}\n")
        return 2
    if command == "doctor":
        return _doctor(prog, rest)
    from . import demo
    return demo.main(rest)
