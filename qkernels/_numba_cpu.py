"""Numba CPU set-up shared by the "cpu" backend's kernels (``qkernels/*/_cpu.py``): the
threading layer, and the lock under which a parallel kernel runs.

The layer decides the fixed cost of every CPU op, since each kernel is one parallel region:
- Intel TBB ("tbb"): about 2 us a region, thread-safe and fork-safe. Used when the ``tbb``
  package is installed (a core dependency on x86-64 Linux). Its wheel puts ``libtbb.so.12``
  in the environment's ``lib/``, where Numba's TBB pool does not look, so it is loaded here
  first (``_preload_tbb``).
- "workqueue": fork-safe, but about 85 us a region on 2 cores, and one parallel kernel at a
  time in a process; the fallback.
- GNU OpenMP (Numba's own default where TBB is missing) is never chosen: once a parallel
  kernel has run, a forked child (a DataLoader worker, a two-rank gloo test) hangs at its
  own first parallel region.

``PARALLEL_LOCK`` serializes launches only under workqueue (Python threads calling the ops
together queue there instead of aborting the process); under TBB it is a no-op. A user's own
``NUMBA_THREADING_LAYER`` wins (TBB is preloaded for it too), and so does a layer that a
parallel kernel started before qkernels was imported (``_layer``); only a layer known to be
TBB goes unlocked.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading

import numba


def _preload_tbb() -> bool:
    """Load ``libtbb.so.12`` from the environment's ``lib/`` with global symbols, so that
    Numba's TBB pool (which needs that soname and has no search path to it) loads; True on
    success. Other platforms, or no ``tbb`` package: False."""
    if not sys.platform.startswith("linux"):
        return False
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        path = os.path.join(prefix, "lib", "libtbb.so.12")
        if os.path.exists(path):
            try:
                lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                lib.TBB_runtime_interface_version.restype = ctypes.c_int
                if lib.TBB_runtime_interface_version() < 12060:  # Numba's minimum, TBB 2021.6
                    return False
                from numba.np.ufunc import tbbpool  # noqa: F401  (the pool itself must load too)
                return True
            except (OSError, ImportError, AttributeError):
                return False
    return False


# loaded whatever the layer: a user's NUMBA_THREADING_LAYER of tbb (or default / safe /
# threadsafe, which try TBB first) needs the library found just as much
_TBB = _preload_tbb()


def _layer() -> str:
    """The threading layer our kernels will run on. If a parallel kernel already ran in this
    process (before qkernels was imported), the layer it started is fixed: that one; else the
    user's NUMBA_THREADING_LAYER, or ours, set here (TBB where it loads, else workqueue)."""
    from numba.np.ufunc import parallel
    if getattr(parallel, "_is_initialized", False):
        return numba.threading_layer()
    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "tbb" if _TBB else "workqueue"
    return numba.config.THREADING_LAYER


LAYER = _layer()
# no lock only where the layer is known to be TBB (a requested "default" may still resolve
# to workqueue, which aborts the process on concurrent launches)
PARALLEL_LOCK = contextlib.nullcontext() if LAYER == "tbb" else threading.RLock()
