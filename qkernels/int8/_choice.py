"""The int8 family's kernel choice: which CUDA kernel multiplies x (M, K) by an int8 weight
(N, K) on a device, a cached function of (op, device, shapes, dtype, alignment) with a
``kernel=`` keyword that tests and benchmarks use to force one. Read by the launchers in
``_cupy.py`` (GEMM, int8.cu / gemm_sm90.cu) and ``_cupy_gemv.py`` (GEMV, gemv.cu)."""
from __future__ import annotations

import functools

_ES = {"float32": 4, "float16": 2, "bfloat16": 2}

# The family's product kernels, by the names that the ``kernel=`` keyword of the launchers
# takes and ``kernel_choice`` returns.
# GEMM of int8 operands (launch_gemm, gemm, int8_matmul_dequant_torch; the outlier forward
# above GEMV_MAX_ROWS rows):
#   "sm90", "sm90_bn128", "sm90_bk64"  gemm_sm90.cu (wgmma, persistent CTAs) with the tile
#       (BN, BK, STAGES) of _SM90_TILES (BN 256 runs one CTA per SM, BN 128 two); needs
#       compute capability 9.0, K % 16 == 0 and 16-byte aligned operands
#   "mma_sync"  int8.cu's int8_gemm (mma.sync, 128 x 128 tiles): any device, any K
# LLM.int8() forward of a float x with at most GEMV_MAX_ROWS rows (_cupy_gemv, gemv.cu):
#   "gemv_staged"  int8_gemv<STAGED>: every CTA quantizes x into shared memory (one launch)
#   "gemv_dp4a"    int8_gemv_quant, then int8_gemv (dp4a) on the codes (two launches)
#   "gemv_mma"     int8_gemv_quant, then int8_gemv_mma (tensor cores, the same bits); needs
#                  K % 16 == 0 and a 16-byte aligned weight
_SM90_TILES = {"sm90": (256, 128, 4), "sm90_bn128": (128, 128, 3), "sm90_bk64": (256, 64, 4)}
GEMM_KERNELS = (*_SM90_TILES, "mma_sync")
GEMV_KERNELS = ("gemv_staged", "gemv_dp4a", "gemv_mma")
GEMV_MAX_ROWS = 16                 # gemv.cu's largest row bound (template MT)
_GEMV_MMA_MIN_ROWS = 4             # the tensor-core GEMV from this many rows (aligned weights)
# Staged when x has at most this many bytes: each CTA (one per SM) then reads x from L2
# before its first dot product (the first weight loads already in flight), ~0.5 us for
# 32 KB against ~2-3 us for a second launch in a CUDA graph. Above it the per-SM re-read of
# x grows past the per-SM share of a 4096 x 4096 weight (124 KB).
_GEMV_STAGE_MAX_X_BYTES = 32 * 1024
_GEMV_SMEM_DEFAULT = 46 * 1024      # dynamic shared memory without the opt-in (48 KB less static)


@functools.lru_cache(maxsize=None)
def _is_sm90(device: int) -> bool:
    import cupy
    return cupy.cuda.Device(device).compute_capability == "90"


def _forced(kernel: str, allowed: tuple, op: str) -> str:
    if kernel not in allowed:
        raise ValueError(f"kernel for {op!r} must be one of {', '.join(allowed)} or None; got {kernel!r}")
    return kernel


@functools.lru_cache(maxsize=4096)
def kernel_choice(op: str, device: int, M: int, N: int, K: int, dtype: str, aligned: bool,
                  kernel: str | None = None) -> str | None:
    """The int8 kernel for out (M, N) = x (M, K) @ W (N, K)^T on CUDA device ``device``.

    op: "gemm" (x int8, already quantized; dtype is ignored), "linear" (LLM.int8() forward
    of a float x of ``dtype``, threshold 0, 1 <= M <= GEMV_MAX_ROWS) or "linear_outliers"
    (threshold > 0, the codes made beforehand by row_quant; any M).
    aligned: K % 16 == 0 and the int8 operands' bases 16-byte aligned (x's too for "gemm").
    kernel: None chooses; a name from GEMM_KERNELS or GEMV_KERNELS forces that kernel
    (ValueError where it cannot run these operands).
    Returns a kernel name, or None for "linear_outliers" where no fused form exists (more
    than GEMV_MAX_ROWS rows off compute capability 9.0): the caller then synchronizes.
    Chosen: "gemm": "sm90" on compute capability 9.0 with aligned operands, else
    "mma_sync". "linear": "gemv_mma" from 4 rows on aligned weights, else "gemv_staged"
    where x fits (at most 32 KB, and its codes in shared memory), else "gemv_dp4a".
    "linear_outliers": the GEMV as "linear" but never staged (it reads the given codes),
    "sm90" above GEMV_MAX_ROWS rows."""
    if op not in ("gemm", "linear", "linear_outliers"):
        raise ValueError(f"op must be 'gemm', 'linear' or 'linear_outliers'; got {op!r}")
    if op == "gemm" or (op == "linear_outliers" and M > GEMV_MAX_ROWS):
        sm90 = _is_sm90(device)
        if kernel is None:
            if op == "gemm":
                return "sm90" if sm90 and aligned else "mma_sync"
            return "sm90" if sm90 and aligned else None
        allowed = GEMM_KERNELS if op == "gemm" else tuple(_SM90_TILES)
        _forced(kernel, allowed, op)
        if kernel in _SM90_TILES and not (sm90 and aligned):
            raise ValueError(f"kernel {kernel!r} needs compute capability 9.0, K % 16 == 0 and "
                             "16-byte aligned operands")
        return kernel
    if not 1 <= M <= GEMV_MAX_ROWS:
        raise ValueError(f"the GEMV takes 1 to {GEMV_MAX_ROWS} rows of x; got {M}")
    nbytes = M * K * _ES[dtype]
    fits = M * (-(-K // 16)) * 16 <= _GEMV_SMEM_DEFAULT  # x's codes in shared memory
    if kernel is None:
        if aligned and M >= _GEMV_MMA_MIN_ROWS:
            return "gemv_mma"
        staged = op == "linear" and fits and nbytes <= _GEMV_STAGE_MAX_X_BYTES
        return "gemv_staged" if staged else "gemv_dp4a"
    _forced(kernel, GEMV_KERNELS if op == "linear" else ("gemv_dp4a", "gemv_mma"), op)
    if kernel == "gemv_mma" and not aligned:
        raise ValueError("the tensor-core GEMV needs K % 16 == 0 and a 16-byte aligned weight")
    if kernel == "gemv_staged" and not fits:
        raise ValueError(f"x is too large to stage in shared memory: {M} x {K}")
    return kernel
