"""qkernels: bitsandbytes-class quantization kernels for NumPy, CuPy, Numba and PyTorch.

The public array API takes NumPy, CuPy and Numba arrays and torch tensors and returns the
caller's kind. Each op runs on one of three backends: ``numpy`` (the reference, always
there), ``cupy`` (CUDA C RawKernels) or ``numba`` (``@cuda.jit`` kernels); see
``available_backends()`` and ``use_backend()``. Importing qkernels never touches a GPU.
"""
from reference.state import QuantState
from ._backend import available_backends, backend_status, use_backend
from .blockwise import dequantize_blockwise, quantize_blockwise

__version__ = "0.1.0"

__all__ = [
    "QuantState", "available_backends", "backend_status", "use_backend",
    "quantize_blockwise", "dequantize_blockwise", "__version__",
]
