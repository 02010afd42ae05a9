"""``python -m qkernels doctor``: the diagnostic report, runnable with qkernels alone.

qkernels lies below torch_ops and never imports it, so the full command (``demo`` trains
torch_ops layers; ``bench`` runs the source tree's benchmarks) is the installed ``qkernels``
script, torch_ops.cli (``python -m torch_ops`` without the script). Asked here for one of
those, this says where it is and exits 2.
"""
from __future__ import annotations

import sys

_PROG = "python -m qkernels"
_ELSEWHERE = {
    "demo": "run: qkernels demo (or: python -m torch_ops demo)",
    "bench": "from a source checkout's root run: python -m benchmarks",
}
_HELP = f"""\
usage: {_PROG} doctor

Print the versions of qkernels and its dependencies, the CUDA devices, which
backends load (and why the others do not), and a smoke test of each backend
that loads, compared with the NumPy reference.
Exit status: 0 when every smoke test passes, 1 otherwise.

The demo is the installed command: qkernels demo (or: python -m torch_ops demo).
The benchmarks run from a source checkout's root: python -m benchmarks
"""


def main(argv=None) -> int:
    """Run ``python -m qkernels doctor``; returns the exit status (2 for a usage error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv in (["doctor", "-h"], ["doctor", "--help"]):
        (sys.stdout if argv else sys.stderr).write(_HELP)
        return 0 if argv else 2
    if argv[0] in _ELSEWHERE:
        sys.stderr.write(f"{_PROG} {argv[0]}: not part of qkernels itself; {_ELSEWHERE[argv[0]]}\n")
        return 2
    if argv != ["doctor"]:
        sys.stderr.write(f"{_PROG}: error: expected 'doctor' and no options; "
                         f"got {' '.join(argv)!r}\n")
        return 2
    from .doctor import doctor
    return doctor()


if __name__ == "__main__":
    sys.exit(main())
