"""Numba CPU set-up shared by the "cpu" backend's kernels (``qkernels/*/_cpu.py``): the
threading layer, and the lock under which a parallel kernel runs.

Numba's default threading layer here is GNU OpenMP, which is not fork-safe: once a parallel
kernel has run, a forked child (a DataLoader worker, ``torch.multiprocessing`` with fork, a
two-rank gloo test) hangs at its own first parallel region. The workqueue layer is fork-safe
but lets one parallel kernel run at a time in a process, so every launch takes
``PARALLEL_LOCK`` (Python threads calling the ops together queue there instead of aborting
the process). A user's own ``NUMBA_THREADING_LAYER`` wins. It also shares two cores better
with torch's OpenMP threads: measured ~3x lower medians for the 4-bit CPU matmul under load.
"""
from __future__ import annotations

import os
import threading

import numba

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

PARALLEL_LOCK = threading.RLock()
