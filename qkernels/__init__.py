"""qkernels: bitsandbytes-class quantization kernels for NumPy, CuPy, Numba and PyTorch.

The public array API takes NumPy, CuPy and Numba arrays and torch tensors and returns the
caller's kind. Each op runs on one of three backends: ``numpy`` (the reference, always
there), ``cupy`` (CUDA C RawKernels) or ``numba`` (``@cuda.jit`` kernels); see
``available_backends()`` and ``use_backend()``. Importing qkernels never touches a GPU.

Families: ``blockwise`` (8-bit dynamic), ``fourbit`` (NF4/FP4, double quantization,
matmul_4bit), ``int8`` (SwitchBack and LLM.int8() quantizers, the int8 GEMM with fused
dequantization), ``optim`` (fused 8-bit optimizer updates).

The quantization functions, ``QuantState`` and the codebook constructors (``create_*_map``,
``get_4bit_type``) have bitsandbytes.functional's names, parameters and return types, so
``import qkernels as F`` stands in for ``from bitsandbytes import functional as F``.
"""
from reference.state import QuantState
from ._backend import available_backends, backend_status, use_backend
from .blockwise import dequantize_blockwise, quantize_blockwise
from .codebooks import (create_dynamic_map, create_fp8_map, create_linear_map, create_normal_map,
                        get_4bit_type)
from .fourbit import (dequantize_4bit, dequantize_fp4, dequantize_nf4, gemv_4bit, matmul_4bit,
                      quantize_4bit, quantize_fp4, quantize_nf4)
from .int8 import (dequantize_rowwise, int8_double_quant, int8_linear_matmul,
                   int8_matmul_mixed_dequantize, int8_matmul_rowwise_dequantize, int8_mm_dequant,
                   int8_vectorwise_dequant, int8_vectorwise_quant, quantize_columnwise_and_transpose,
                   quantize_global, quantize_global_transpose, quantize_rowwise)
from .optim import optimizer_update_8bit_blockwise, optimizer_update_32bit

__version__ = "0.1.0"

# torch-level names, imported on first use so that ``import qkernels`` never imports torch:
# name -> (module, attribute)
_LAZY = {
    "matmul": ("qkernels.int8.matmul_lt", "matmul"),
    "MatmulLtState": ("qkernels.int8.matmul_lt", "MatmulLtState"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "QuantState", "available_backends", "backend_status", "use_backend", "__version__",
    "quantize_blockwise", "dequantize_blockwise",
    "create_dynamic_map", "create_linear_map", "create_fp8_map", "create_normal_map",
    "get_4bit_type",
    "quantize_4bit", "dequantize_4bit", "quantize_nf4", "quantize_fp4", "dequantize_nf4",
    "dequantize_fp4", "matmul_4bit", "gemv_4bit",
    "quantize_rowwise", "quantize_global", "quantize_global_transpose",
    "quantize_columnwise_and_transpose", "dequantize_rowwise", "int8_matmul_rowwise_dequantize",
    "int8_matmul_mixed_dequantize", "int8_vectorwise_quant", "int8_vectorwise_dequant",
    "int8_linear_matmul", "int8_mm_dequant", "int8_double_quant",
    "optimizer_update_8bit_blockwise", "optimizer_update_32bit",
]  # the _LAZY names stay out of it: ``from qkernels import *`` does not import torch either
