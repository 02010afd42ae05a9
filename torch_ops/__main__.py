"""``python -m torch_ops COMMAND``: the ``qkernels`` command (torch_ops.cli) without its
installed script."""
import sys

from .cli import main

sys.exit(main(prog="python -m torch_ops"))
