"""CuPy launcher for gemv.cu: the LLM.int8() linear forward (threshold 0) for x with at most
``MAX_ROWS`` rows, the torch hot path of Linear8bitLt at small batch.

``int8_linear_gemv_torch(x, CB, SCB, bias)`` returns exactly
``int8_mm_dequant(int8_linear_matmul(CA, CB), SCA, SCB, bias)`` in x's dtype, with
``CA, SCA = int8_vectorwise_quant(x)``: the same codes, the same exact int32 products and the
same float32 epilogue as the quantize + int8 GEMM path (int8.cu), in one or two launches
instead of a 128 x 128-tile GEMM that is ~95% idle at these sizes. Raw pointers, torch's
current stream, outputs and workspaces from ``torch.empty`` (CUDA-graph safe, no host sync).

Launch forms (chosen by ``_cupy.kernel_choice``, forced with ``kernel=``): "gemv_staged",
every CTA quantizes a small x into shared memory (one launch; x is re-read from L2 once per
SM); "gemv_dp4a", x is quantized once by ``int8_gemv_quant`` (one CTA per row) and the GEMV
reads the codes through L1 (two launches); "gemv_mma", the same two launches with
``int8_gemv_mma`` (tensor cores, the same bits) as the second, from a few rows on aligned
weights.
"""
from __future__ import annotations

import functools

import numpy as np

from .._cuda import DTYPE_CODES as _DT, get_kernel, multiprocessor_count
from .._cuda.launch import memset_async
from .._interop import _external_stream, torch_stream
from ._choice import _ES, GEMV_MAX_ROWS as MAX_ROWS, kernel_choice

_THREADS = 512            # GV_THREADS in gemv.cu
_WARPS = _THREADS // 32
_MT = (1, 2, 4, 8, MAX_ROWS)  # the template row bounds
_MMA_NT = 1               # 8 * _MMA_NT weight rows per CTA (template NT)
_MMA_THREADS = 256        # GM_WARPS * 32 in gemv.cu


def gemv_rows(m: int) -> int | None:
    """The template row bound MT for m rows of x, or None when m is outside 1..MAX_ROWS."""
    if m < 1:
        return None
    for mt in _MT:
        if m <= mt:
            return mt
    return None


def gemv_ok(x, CB, SCB, bias=None) -> bool:
    """Whether int8_linear_gemv_torch takes this call: x (M, K) with 1 <= M <= MAX_ROWS and
    K >= 1 in a float dtype, CB int8 (N, K), SCB float32 (N,), bias None or (N,) float, all
    on x's CUDA device."""
    if x.dim() != 2 or CB.dim() != 2 or not x.is_cuda:
        return False
    M, K = x.shape
    N = CB.shape[0]
    if gemv_rows(M) is None or K == 0 or N == 0 or CB.shape[1] != K:
        return False
    name = str(x.dtype).replace("torch.", "")
    if name not in _DT or str(CB.dtype) != "torch.int8" or str(SCB.dtype) != "torch.float32":
        return False
    if SCB.numel() != N or SCB.device != x.device or CB.device != x.device:
        return False
    if bias is not None:
        bname = str(bias.dtype).replace("torch.", "")
        if bname not in _DT or bias.numel() != N or bias.device != x.device:
            return False
    return True


@functools.lru_cache(maxsize=None)
def _function(device: int, name: str):
    """The compiled cupy.cuda.Function (launch: fn(grid, block, args, shared_mem, stream))."""
    import cupy
    with cupy.cuda.Device(device):
        return get_kernel(__package__, "gemv.cu", name).kernel


@functools.lru_cache(maxsize=None)
def _int8_function(device: int, name: str):
    """A kernel of int8.cu (the quantizers beside the GEMM) compiled for ``device``."""
    import cupy
    with cupy.cuda.Device(device):
        return get_kernel(__package__, "int8.cu", name).kernel


def int8_linear_gemv_torch(x, CB, SCB, bias=None, outliers=None, kernel: str | None = None):
    """out (M, N) in x's dtype = ((f32(CA @ CB^T) * SCA[:, None]) * SCB[None, :]) * K (+ bias)
    with CA, SCA = int8_vectorwise_quant(x) (threshold 0).

    x: float16 / bfloat16 / float32 (M, K) contiguous, 1 <= M <= MAX_ROWS; CB: int8 (N, K)
    contiguous; SCB: float32 (N,) contiguous; bias: (N,) of any float dtype, contiguous, or
    None. The caller checks with ``gemv_ok``. ``kernel``: None chooses the launch form
    (``_cupy.kernel_choice``: "gemv_mma" from 4 rows on aligned weights, "gemv_staged" for a
    small x, else "gemv_dp4a"); one of those names forces it (tests, benchmarks;
    ValueError where it cannot run).

    ``outliers`` (threshold > 0, K % 16 == 0): (codes int8 (M, K), absmax float32 (M,), idx
    int64 (K,), count int32 (1,)) from row_quant + outlier_cols (int8_outlier_quant_torch):
    the GEMV reads those codes (one launch) and adds x's outlier columns idx[:count] in
    float32 (gemv.cu); the result is then ``int8_linear_outliers`` rather than the threshold-0
    product.
    """
    import torch
    M, K = x.shape
    N = CB.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    dtype = str(x.dtype).replace("torch.", "")
    es = _ES[dtype]
    nch = -(-K // 16)
    mt = gemv_rows(M)
    aligned = K % 16 == 0 and CB.data_ptr() % 16 == 0
    if outliers is not None and K % 16:
        raise ValueError("the outlier form reads unpadded codes: needs K % 16 == 0")
    device = x.device.index
    kernel = kernel_choice("linear" if outliers is None else "linear_outliers", device, M, N, K,
                           dtype, aligned, kernel)
    use_mma, staged = kernel == "gemv_mma", kernel == "gemv_staged"
    x_vec_ok = int(x.data_ptr() % 16 == 0 and (K * es) % 16 == 0)
    bdt = -1 if bias is None else _DT[str(bias.dtype).replace("torch.", "")]
    if use_mma:
        gemv = _function(device, f"int8_gemv_mma<{_DT[dtype]}, {bdt}, {_MMA_NT}>")
        grid, block = (-(-N // (8 * _MMA_NT)),), (_MMA_THREADS,)
    else:
        gemv = _function(device, f"int8_gemv<{_DT[dtype]}, {bdt}, {mt}, {'true' if staged else 'false'}, "
                                 f"{'true' if aligned else 'false'}>")
        ntasks = (N + 1) // 2
        grid = (max(1, min(-(-ntasks // _WARPS), multiprocessor_count(device))),)
        block = (_THREADS,)
    stream = _external_stream(torch_stream(x)[1])
    codes = absmax = None
    idx = count = 0
    if outliers is not None:
        codes, absmax, idx_t, count_t = outliers
        idx, count = idx_t.data_ptr(), count_t.data_ptr()
    elif not staged:
        codes = torch.empty((M, nch * 16), dtype=torch.int8, device=x.device)
        absmax = torch.empty((M,), dtype=torch.float32, device=x.device)
    gemv_args = (np.uint64(x.data_ptr()), np.uint64(0 if codes is None else codes.data_ptr()),
                 np.uint64(0 if absmax is None else absmax.data_ptr()), np.uint64(CB.data_ptr()),
                 np.uint64(SCB.data_ptr()), np.uint64(0 if bias is None else bias.data_ptr()),
                 np.uint64(out.data_ptr()), np.int32(M), np.int32(N), np.int32(K), np.int32(nch),
                 np.int32(x_vec_ok), np.uint64(idx), np.uint64(count))
    smem = M * nch * 16 if staged else 0

    def launch():
        if not staged and outliers is None:
            quant = _function(device, f"int8_gemv_quant<{_DT[dtype]}>")
            threads = min(_THREADS, max(32, -(-nch // 32) * 32))
            quant((M,), (threads,), (np.uint64(x.data_ptr()), np.uint64(codes.data_ptr()),
                                     np.uint64(absmax.data_ptr()), np.int32(K), np.int32(nch),
                                     np.int32(x_vec_ok)), 0, stream)
        gemv(grid, block, gemv_args, smem, stream)

    if torch.cuda.current_device() != device:
        import cupy
        with cupy.cuda.Device(device):
            launch()
    else:
        launch()
    return out


# --- prepared launches for one weight (qkernels.int8.ops) -----------------------------------

_TORCH_NAMES: dict = {}  # torch dtype -> its name here (filled on first use; no torch import above)
_TORCH_U8: list = []     # [torch.uint8], likewise
_GEMV_SIG = "pppppppiiiiipp"   # x, codes, absmax, CB, SCB, bias, out, M, N, K, nch, x_vec_ok, idx, count
_QUANT_SIG = "pppiii"          # int8_gemv_quant: x, codes, absmax, K, nch, vec_ok
_ROW_QUANT_SIG = "ppppiifi"    # row_quant: x, q, stats, flags, rows, cols, threshold, vec_ok
_OUTLIER_COLS_SIG = "pipipp"   # outlier_cols: flags, cols, q, rows, idx, count


class PreparedWeight8bit:
    """The LLM.int8() forward for at most MAX_ROWS rows of x against one int8 weight on one
    CUDA device, with every weight-dependent launch argument written once: the launches of
    ``int8_linear_gemv_torch`` (threshold 0) and of ``int8_linear_outliers_torch`` for small
    batches (threshold > 0), the same kernels, choices and bits.

    CB: int8 (N, K) contiguous; SCB: float32 (N,) contiguous, on one CUDA device, held here
    (``hold=True``) so that the pointers stay valid for the object's life; ``hold=False`` keeps
    only the pointers (see qkernels._cuda.launch.PlanCache).
    """

    def __init__(self, CB, SCB, hold: bool = True):
        import torch
        if not _TORCH_NAMES:
            _TORCH_NAMES.update({torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"})
            _TORCH_U8.append(torch.uint8)
        self.device = CB.device.index
        self.N, self.K = CB.shape
        self.tensors = (CB, SCB) if hold else None
        self.nch = -(-self.K // 16)
        self.aligned = self.K % 16 == 0 and CB.data_ptr() % 16 == 0
        self._cb, self._scb = CB.data_ptr(), SCB.data_ptr()
        self._launches: dict = {}
        self.last_ws = None  # forward_outliers' last workspace (its outlier columns: last_outlier_cols)
        self._routes: dict = {}
        self._row_quant_ctas: dict = {}

    def usable(self, M: int) -> bool:
        return 1 <= M <= MAX_ROWS and self.K > 0 and self.N > 0

    def _function(self, name: str):
        return _function(self.device, name)

    def _gemv(self, dtype: str, bdt: int, M: int, outliers: bool):
        """(launch, staged) of the GEMV for M rows, as int8_linear_gemv_torch chooses it."""
        mt = gemv_rows(M)
        kernel = kernel_choice("linear_outliers" if outliers else "linear", self.device, M, self.N,
                               self.K, dtype, self.aligned)
        use_mma, staged = kernel == "gemv_mma", kernel == "gemv_staged"
        key = ("gemv", dtype, bdt, mt, staged, use_mma)
        launch = self._launches.get(key)
        if launch is None:
            from .._cuda.launch import PreparedLaunch
            if use_mma:
                fn = self._function(f"int8_gemv_mma<{_DT[dtype]}, {bdt}, {_MMA_NT}>")
                grid, block = (-(-self.N // (8 * _MMA_NT)),), (_MMA_THREADS,)
            else:
                fn = self._function(f"int8_gemv<{_DT[dtype]}, {bdt}, {mt}, {'true' if staged else 'false'}, "
                                    f"{'true' if self.aligned else 'false'}>")
                ntasks = (self.N + 1) // 2
                grid = (max(1, min(-(-ntasks // _WARPS), multiprocessor_count(self.device))),)
                block = (_THREADS,)
            fixed = {3: self._cb, 4: self._scb, 8: self.N, 9: self.K, 10: self.nch}
            launch = self._launches[key] = PreparedLaunch(fn, _GEMV_SIG, fixed, (0, 1, 2, 5, 6, 7, 11, 12, 13),
                                                          grid, block)
        return launch, staged

    def _quant(self, dtype: str):
        """int8_gemv_quant<dtype> (one CTA per row of x), made on first use."""
        launch = self._launches.get(("quant", dtype))
        if launch is None:
            from .._cuda.launch import PreparedLaunch
            threads = min(_THREADS, max(32, -(-self.nch // 32) * 32))
            launch = self._launches[("quant", dtype)] = PreparedLaunch(
                self._function(f"int8_gemv_quant<{_DT[dtype]}>"), _QUANT_SIG, {3: self.K, 4: self.nch},
                (0, 1, 2, 5), (1,), (threads,))
        return launch

    def _route(self, x_dtype, bias_dtype, M: int):
        """(gemv launch, quant launch or None, shared memory, workspace bytes, x's rows are
        16-byte multiples) of the threshold-0 forward for M rows: what ``forward`` needs per
        call, worked out once per (x dtype, bias dtype, M)."""
        dtype = _TORCH_NAMES[x_dtype]
        bdt = -1 if bias_dtype is None else _DT[_TORCH_NAMES[bias_dtype]]
        gemv, staged = self._gemv(dtype, bdt, M, False)
        rows16 = (self.K * _ES[dtype]) % 16 == 0
        if staged:
            route = (gemv, None, M * self.nch * 16, 0, rows16)
        else:  # codes (M, nch * 16) int8, then absmax float32 (M,): one workspace
            route = (gemv, self._quant(dtype), 0, M * self.nch * 16 + 4 * M, rows16)
        self._routes[(x_dtype, bias_dtype, M)] = route
        return route

    def forward(self, x, M: int, bias, stream: int):
        """out (..., N) in x's dtype for x (..., K) contiguous with M rows (1 <= M <=
        MAX_ROWS), bias (N,) of a float dtype, contiguous, or None, threshold 0:
        ``int8_linear_gemv_torch(x, CB, SCB, bias)``."""
        import torch
        bias_dtype = None if bias is None else bias.dtype
        route = self._routes.get((x.dtype, bias_dtype, M)) or self._route(x.dtype, bias_dtype, M)
        gemv, quant, smem, ws_bytes, rows16 = route
        out = x.new_empty((*x.shape[:-1], self.N))
        xp = x.data_ptr()
        x_vec_ok = int(rows16 and xp % 16 == 0)
        bp = 0 if bias is None else bias.data_ptr()
        if quant is None:  # staged: every CTA quantizes x into shared memory
            gemv.launch(stream, xp, 0, 0, bp, out.data_ptr(), M, x_vec_ok, 0, 0, smem=smem)
            return out
        ws = x.new_empty((ws_bytes,), dtype=torch.uint8)
        codes = ws.data_ptr()
        absmax = codes + M * self.nch * 16
        quant.launch(stream, xp, codes, absmax, x_vec_ok, grid_x=M)
        gemv.launch(stream, xp, codes, absmax, bp, out.data_ptr(), M, x_vec_ok, 0, 0, smem=0)
        return out

    def _route_outliers(self, x_dtype, bias_dtype, M: int):
        """What ``forward_outliers`` needs per call for M rows of x_dtype (and bias_dtype),
        worked out once: (row_quant, outlier_cols and GEMV launches, their grids along x, the
        workspace's bytes, the bytes its memset zeroes, its offsets of count, idx, stats and
        q, x's rows are 16-byte multiples). Workspace: flags u8 (cpad) | count int32 (16
        bytes) | idx int64 (K,) | stats f32 (M, padded to 16 bytes) | q int8 (M, K)."""
        K = self.K
        dtype = _TORCH_NAMES[x_dtype]
        es = _ES[dtype]
        row_quant = self._launches.get(("row_quant", dtype)) or self._row_quant(dtype, 2 if es == 2 else 4)
        cols = self._launches.get("outlier_cols") or self._outlier_cols()
        bdt = -1 if bias_dtype is None else _DT[_TORCH_NAMES[bias_dtype]]
        gemv, _ = self._gemv(dtype, bdt, M, True)
        cpad = -(-K // 16) * 16
        zeroed = cpad + 16 + 8 * K
        stats_bytes = -(-4 * M // 16) * 16
        route = (row_quant, cols, gemv, min(M, self._row_quant_ctas[dtype]),
                 min(M, 2 * multiprocessor_count(self.device)), zeroed + stats_bytes + M * K, zeroed,
                 (cpad, cpad + 16, zeroed, zeroed + stats_bytes), (K * es) % 16 == 0)
        self._routes[("outliers", x_dtype, bias_dtype, M)] = route
        return route

    def forward_outliers(self, x, M: int, bias, threshold: float, stream: int):
        """out (..., N) in x's dtype for threshold > 0 (x and bias as in ``forward``; needs
        ``self.aligned``): ``int8_linear_outliers_torch(x, CB, SCB, bias, threshold)[0]`` for
        at most MAX_ROWS rows: row_quant<THRESH>, outlier_cols, then the GEMV that reads their
        codes and adds x's outlier columns. One workspace, its flags, count and column list
        zeroed by one memset; no host synchronization. An object that holds its weight keeps the
        workspace for ``last_outlier_cols``; one made with ``hold=False`` (the declared op's
        cache) keeps nothing, as torch.compile's CUDA graphs require of memory that outlives a
        call."""
        bias_dtype = None if bias is None else bias.dtype
        route = self._routes.get(("outliers", x.dtype, bias_dtype, M)) or self._route_outliers(x.dtype, bias_dtype, M)
        row_quant, cols, gemv, rq_grid, cols_grid, ws_bytes, zeroed, offsets, rows16 = route
        out = x.new_empty((*x.shape[:-1], self.N))
        ws = x.new_empty((ws_bytes,), dtype=_TORCH_U8[0])
        if self.tensors is not None:
            self.last_ws = ws
        flags = ws.data_ptr()
        count, idx, stats, q = (flags + o for o in offsets)
        memset_async(flags, zeroed, stream)
        xp = x.data_ptr()
        x_vec_ok = int(rows16 and xp % 16 == 0)
        row_quant.launch(stream, xp, q, stats, flags, M, threshold, x_vec_ok, grid_x=rq_grid)
        cols.launch(stream, flags, q, M, idx, count, grid_x=cols_grid)
        gemv.launch(stream, xp, q, stats, 0 if bias is None else bias.data_ptr(), out.data_ptr(), M,
                    x_vec_ok, idx, count, smem=0)
        return out

    def last_outlier_cols(self):
        """The outlier columns (int64 (count,), ascending) of the last ``forward_outliers``
        input, copied out of its workspace (reads the count: one host synchronization)."""
        import torch
        ws = self.last_ws
        if ws is None:
            return None
        cpad = -(-self.K // 16) * 16
        count = int(ws[cpad:cpad + 4].view(torch.int32).item())
        return ws[cpad + 16:cpad + 16 + 8 * self.K].view(torch.int64)[:count].clone()

    def _row_quant(self, dtype: str, nv: int):
        """row_quant<dtype, float32, nv, THRESH> for rows of K values: its launch, and in
        ``_row_quant_ctas`` the CTAs of one wave (launch_row_quant's grid)."""
        from .._cuda.launch import PreparedLaunch
        vec = 16 // _ES[dtype]
        per_thread = -(-(-(-self.K // vec)) // nv)  # 16-byte vectors a thread loads, in units of nv
        threads = min(1024, max(32, -(-per_thread // 32) * 32))
        self._row_quant_ctas[dtype] = min(32, max(1, 1024 // threads)) * multiprocessor_count(self.device)
        fn = _int8_function(self.device, f"row_quant<{_DT[dtype]}, {_DT['float32']}, {nv}, true>")
        launch = self._launches[("row_quant", dtype)] = PreparedLaunch(
            fn, _ROW_QUANT_SIG, {5: self.K}, (0, 1, 2, 3, 4, 6, 7), (1,), (threads,))
        return launch

    def _outlier_cols(self):
        from .._cuda.launch import PreparedLaunch
        fn = _int8_function(self.device, "outlier_cols")
        launch = self._launches["outlier_cols"] = PreparedLaunch(fn, _OUTLIER_COLS_SIG, {1: self.K},
                                                                 (0, 2, 3, 4, 5), (1,), (256,))
        return launch
