"""Shared test set-up: Hypothesis profiles, the gpu marker, backend parametrization."""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

# CI sets CI=true, which would load Hypothesis' built-in "ci" profile; pick ours explicitly.
settings.register_profile("dev", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("gpu", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("cudasim", max_examples=8, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
_default = "cudasim" if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" else \
    ("ci" if os.environ.get("CI") else "dev")
settings.load_profile(os.environ.get("QKERNELS_HYPOTHESIS_PROFILE", _default))


def _has_cuda() -> bool:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return False
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


HAS_CUDA = _has_cuda()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


def gpu_backends() -> list[str]:
    """The GPU backends that load here (empty on a machine without a GPU)."""
    if not HAS_CUDA:
        return []
    from qkernels import available_backends
    return [b for b in available_backends() if b != "numpy"]
