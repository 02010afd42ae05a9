"""The NumPy reference: codebooks, data formats and every op of qkernels, vectorized.

It depends on NumPy alone and is the test oracle for the GPU kernels: each op here
defines the exact float32 answer they reproduce.
"""
from .blockwise import dequantize_blockwise, quantize_blockwise
from .codebooks import dynamic_map, fp4_map, fp8_map, get_code, linear_map, nf4_map
from .state import QuantState

__all__ = [
    "QuantState", "dynamic_map", "linear_map", "fp8_map", "nf4_map", "fp4_map", "get_code",
    "quantize_blockwise", "dequantize_blockwise",
]
