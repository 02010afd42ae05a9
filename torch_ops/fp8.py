"""FP8 linear layers: bitsandbytes' simulated-FP8 research layers and a native FP8 path.

    layer = LinearFP8Mixed(1024, 4096)                 # instead of nn.Linear(1024, 4096)
    y = matmul_fp8_mixed(x, layer.weight.t())          # the bare function (bias not added)

Simulated (docs/FORMATS.md §8): the operands of each matmul are quantized and dequantized
("qdq") through 8-bit codebooks, E4M3 forward and E5M2 for gradients, then multiplied in
the activation dtype. qdq_blockwise runs through qkernels.quantize_blockwise (NumPy on
CPU, CuPy on CUDA); qdq_global (one block spanning the tensor) is the NumPy reference
(reference/fp8.py) on CPU and the same float32 math in torch ops on CUDA, bit-identical.
Codebooks live on the host and are copied once per device on first use.

Native (``LinearFP8Mixed(..., native=True)``, ``SwitchBackLinear(..., quant_dtype="fp8")``):
real float8 tensor-core GEMMs through ``torch._scaled_mm`` with row-wise float32 scales,
float8_e4m3fn activations and weights, float8_e5m2 output gradients; needs a CUDA GPU of
compute capability >= 8.9 (Ada, Hopper) and feature counts divisible by 16.

The quantized primitives are ``torch.library`` custom ops (namespace ``qkernels``) with
fake kernels, declared in qkernels.fp8.ops (re-exported here), so
``torch.compile(fullgraph=True)`` traces these layers without a break.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from qkernels.fp8.ops import (E4M3, E5M2, code_name, code_tables, code_tensor,
                              fp8_codes_both_ways, fp8_global, fp8_global_in_torch, fp8_rowwise,
                              fp8_rowwise_in_torch, fp8_scaled_mm, fp8_scaled_mm_routes,
                              native_ops, qdq_blockwise, qdq_global, qdq_global_in_torch)
from reference import fp8 as ref
from ._checks import check_linear_input, compute_dtype

__all__ = ["matmul_fp8_mixed", "matmul_fp8_global", "LinearFP8Mixed", "LinearFP8Global",
           "qdq_global", "qdq_blockwise", "fp8_block_sizes", "check_native_fp8"]

fp8_block_sizes = ref.fp8_block_sizes

# The former private names of what moved to qkernels.fp8.ops, for callers that reached into
# this module (tests/test_fp8_layers.py, benchmarks/fp8.py).
_tables = code_tables
_qdq_global_torch = qdq_global_in_torch
_fp8_rowwise_torch = fp8_rowwise_in_torch
_fp8_global_torch = fp8_global_in_torch


# --- simulated FP8 matmuls ---------------------------------------------------------------------

def _product(a: Tensor, b: Tensor, bias: Tensor | None) -> Tensor:
    """``a (..., K) @ b (K, N) + bias``, the bias added inside the GEMM (one rounding): the
    product torch.compile's inductor makes of a matmul and a bias add, so compiled and eager
    layers give the same bits."""
    if bias is None:
        return torch.matmul(a, b)
    out = torch.addmm(bias.to(a.dtype), a.reshape(-1, a.shape[-1]), b)
    return out.reshape(*a.shape[:-1], b.shape[1])


def _bias_grad(G: Tensor, bias: Tensor | None, needed: bool):
    return G.reshape(-1, G.shape[-1]).sum(0).to(bias.dtype) if needed else None


class MatMulFP8Mixed(torch.autograd.Function):
    """A (..., K) @ B (K, N) (+ bias (N,)). Forward ``qdq(A, fw, bsz) @ qdq_global(B, fw)``;
    backward ``dA = qdq(G, bw, bsz2) @ qdq_global(B)^T``, ``dB = A^T @ G`` in full precision,
    ``dbias = sum(G)``."""

    @staticmethod
    def forward(ctx, A, B, fw: str, bw: str, bsz: int, bsz2: int, bias=None):
        fp8A = qdq_blockwise(A, fw, bsz)
        fp8B = qdq_global(B, fw)
        ctx.bw, ctx.bsz2 = bw, bsz2
        ctx.save_for_backward(A, fp8B, bias)
        return _product(fp8A, fp8B.to(A.dtype), bias)

    @staticmethod
    def backward(ctx, G):
        A, fp8B, bias = ctx.saved_tensors
        dA = dB = None
        if ctx.needs_input_grad[0]:
            Gq = qdq_blockwise(G, ctx.bw, ctx.bsz2)
            dA = torch.matmul(Gq, fp8B.t().to(Gq.dtype)).to(A.dtype)
        if ctx.needs_input_grad[1]:
            A2, G2 = A.reshape(-1, A.shape[-1]), G.reshape(-1, G.shape[-1])
            dB = torch.matmul(A2.t().to(G.dtype), G2).to(fp8B.dtype)
        return dA, dB, None, None, None, None, _bias_grad(G, bias, ctx.needs_input_grad[6])


class MatMulFP8Global(torch.autograd.Function):
    """As MatMulFP8Mixed with global scaling everywhere; ``dB = qdq_global(A)^T @ Gq``."""

    @staticmethod
    def forward(ctx, A, B, fw: str, bw: str, bias=None):
        fp8A = qdq_global(A, fw)
        fp8B = qdq_global(B, fw)
        ctx.bw = bw
        ctx.save_for_backward(fp8A, fp8B, bias)  # qdq_global(A^T) = qdq_global(A)^T: one scale
        return _product(fp8A, fp8B.to(A.dtype), bias)

    @staticmethod
    def backward(ctx, G):
        fp8A, fp8B, bias = ctx.saved_tensors
        Gq = qdq_global(G, ctx.bw)
        dA = dB = None
        if ctx.needs_input_grad[0]:
            dA = torch.matmul(Gq, fp8B.t().to(Gq.dtype)).to(fp8A.dtype)
        if ctx.needs_input_grad[1]:
            A2, G2 = fp8A.reshape(-1, fp8A.shape[-1]), Gq.reshape(-1, Gq.shape[-1])
            dB = torch.matmul(A2.t().to(Gq.dtype), G2).to(fp8B.dtype)
        return dA, dB, None, None, _bias_grad(G, bias, ctx.needs_input_grad[4])


def _matmul_args(A, B, fw_code, bw_code, out, bsz, bsz2):
    if out is not None:
        raise ValueError("out= is not supported (bitsandbytes ignores it); pass out=None")
    if A.shape[-1] != B.shape[0]:
        raise ValueError(f"A (..., K) and B (K, N) must agree in K; got {tuple(A.shape)} and "
                         f"{tuple(B.shape)}")
    if bsz == -1 or bsz2 == -1:
        bsz, bsz2 = fp8_block_sizes(A.shape[-1], B.shape[1])
    bw = "e5m2" if bw_code is None else code_name(bw_code)
    return code_name(fw_code), bw, bsz, bsz2


def matmul_fp8_mixed(A: Tensor, B: Tensor, fw_code=None, bw_code=None, out=None,
                     bsz: int = -1, bsz2: int = -1, *, bias: Tensor | None = None) -> Tensor:
    """Simulated-FP8 ``A @ B`` with blockwise scaling of A: A (..., K), B (K, N) (usually
    ``weight.t()``), same float dtype; codes default to E4M3 (forward) / E5M2 (backward);
    bsz / bsz2 = -1 choose the block sizes of docs/FORMATS.md §8.1 from K and N. Returns (..., N) in A's dtype.
    ``bias`` (N,), keyword only (not in bitsandbytes): added inside the GEMM, one rounding."""
    fw, bw, bsz, bsz2 = _matmul_args(A, B, fw_code, bw_code, out, bsz, bsz2)
    if A.numel() == 0 or B.numel() == 0:  # empty: right shape, zero gradients
        return _product(A, B.to(A.dtype), bias)
    return MatMulFP8Mixed.apply(A, B, fw, bw, bsz, bsz2, bias)


def matmul_fp8_global(A: Tensor, B: Tensor, fw_code=None, bw_code=None, out=None,
                      bsz: int = -1, bsz2: int = -1, *, bias: Tensor | None = None) -> Tensor:
    """Simulated-FP8 ``A @ B`` with one global scale per operand; as matmul_fp8_mixed."""
    fw, bw, _, _ = _matmul_args(A, B, fw_code, bw_code, out, bsz, bsz2)
    if A.numel() == 0 or B.numel() == 0:
        return _product(A, B.to(A.dtype), bias)
    return MatMulFP8Global.apply(A, B, fw, bw, bias)


# --- native FP8 (torch._scaled_mm) -------------------------------------------------------------
# The quantizers (fp8_rowwise, fp8_global: a fused kernel each on CUDA) and the GEMM
# (fp8_scaled_mm, its torch._scaled_mm routes) are qkernels.fp8.ops's custom ops; native_ops()
# gives their bodies in eager mode, the ops under torch.compile.

def check_native_fp8(x: Tensor, in_features: int, out_features: int, what: str) -> None:
    """Raise a clear error unless x lives on a GPU with FP8 tensor cores and the feature
    counts suit torch._scaled_mm."""
    if x.device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"{what} needs a CUDA GPU with FP8 tensor cores (compute capability "
                           f">= 8.9: Ada or Hopper, e.g. H100); the input is on {x.device}. "
                           f"Use the simulated path (native=False / quant_dtype='int8') elsewhere.")
    if in_features % 16 or out_features % 16:
        raise ValueError(f"{what} needs in_features and out_features divisible by 16 "
                         f"(torch._scaled_mm); got {in_features} and {out_features}")
    if torch.compiler.is_compiling():
        return  # the eager call checked the device; its queries are no graph material
    cap = torch.cuda.get_device_capability(x.device)
    if cap < (8, 9):
        raise RuntimeError(f"{what} needs a GPU with FP8 tensor cores (compute capability >= 8.9, "
                           f"e.g. H100); {torch.cuda.get_device_name(x.device)} has {cap[0]}.{cap[1]}")


class FP8NativeLinearFunction(torch.autograd.Function):
    """Native-FP8 linear on X (M, K), W (N, K) of one float dtype, bias (N,) or None.

    Forward: ``Y = fp8(X, e4m3, per row) @ fp8(W, e4m3, per output row or global)^T + bias``,
    the bias added in the GEMM's epilogue. Backward: ``dX = fp8(G, e5m2, per row) @ fp8(W^T,
    e4m3, per input column or global)^T``; ``dW = G^T @ X`` in X's dtype (from the saved e4m3 X
    when ``mem_efficient``); ``dbias = sum(G, 0)``. Each quantization is one fused kernel on
    CUDA (W^T's: two passes over W). dW stays a 16-bit GEMM by default (bitsandbytes' rule:
    the weight gradient in full precision; the tests hold its error under 1%). With
    ``fp8_wgrad`` it is a float8 GEMM too, as in FP8 training recipes such as Transformer
    Engine's: ``dW = fp8(G^T, e5m2, per output feature) @ fp8(X^T, e4m3, per input
    feature)^T``, for about half the dW time (the tests hold its relative error to the exact
    product under 10%, against under 1% for the 16-bit dW); it needs the token count
    to be a multiple of 16 (torch._scaled_mm's inner dimension) and falls back to the 16-bit
    dW otherwise. Under ``fp8_wgrad`` the forward also forms X^T's codes, saved for dW in place
    of X (or of its e4m3 codes: 1 byte per element either way), and, with row-wise W scales,
    W^T's codes for dX (1 byte per weight saved); the backward takes G's codes, G^T's and
    dbias from one fused kernel pair, each pair reading its tensor twice."""

    @staticmethod
    def forward(ctx, X, W, bias, w_rowwise: bool, mem_efficient: bool, fp8_wgrad: bool = False):
        fp8_rowwise, fp8_global, fp8_scaled_mm = native_ops()
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        fp8_wgrad = fp8_wgrad and X.shape[0] % 16 == 0
        XtQ = sXt = WtQ = sWt = None
        if fp8_wgrad and need_dw:   # X^T's codes now, saved in place of X
            Xq, sX, XtQ, sXt, _ = fp8_codes_both_ways(X, E4M3, E4M3, False)
        else:
            Xq, sX = fp8_rowwise(X, E4M3)
        if not w_rowwise:
            Wq, sW = fp8_global(W, E4M3)
            sW = sW.expand(W.shape[0], 1).contiguous()
        elif fp8_wgrad and need_dx:  # W^T's codes for dX now, from the same two reads of W
            Wq, sW, WtQ, sWt, _ = fp8_codes_both_ways(W, E4M3, E4M3, False)
        else:
            Wq, sW = fp8_rowwise(W, E4M3)
        Y = fp8_scaled_mm(Xq, Wq, sX, sW, X.dtype, bias)
        ctx.w_rowwise, ctx.mem_efficient, ctx.has_bias = w_rowwise, mem_efficient, bias is not None
        ctx.fp8_wgrad, ctx.x_dtype, ctx.w_dtype = fp8_wgrad, X.dtype, W.dtype
        ctx.xt, ctx.wt = XtQ is not None, WtQ is not None
        if ctx.xt:
            saved_x = (XtQ, sXt)
        else:
            saved_x = (Xq, sX) if mem_efficient else (X,)
        saved_w = (WtQ, sWt) if ctx.wt else (W,)
        ctx.save_for_backward(*saved_x, *saved_w)
        return Y

    @staticmethod
    def backward(ctx, G):
        saved = list(ctx.saved_tensors)
        if ctx.wt:
            WtQ, sWt = saved[-2:]
            del saved[-2:]
        else:
            W = saved.pop()
        if ctx.xt:
            XtQ, sXt = saved
        elif ctx.mem_efficient:
            Xq, sX = saved
        else:
            (X,) = saved
        G = G.contiguous()
        dX = dW = dbias = None
        fp8_rowwise, fp8_global, fp8_scaled_mm = native_ops()
        want_dbias = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.fp8_wgrad and all(ctx.needs_input_grad[:2]):
            Gq, sG, GtQ, sGt, dbias = fp8_codes_both_ways(G, E5M2, E5M2, want_dbias)
        else:
            Gq = GtQ = None
        if ctx.needs_input_grad[0]:
            if Gq is None:
                Gq, sG = fp8_rowwise(G, E5M2)
            if not ctx.wt:
                if ctx.w_rowwise:
                    WtQ, sWt = fp8_rowwise(W.t(), E4M3)        # per input channel: (K, N)
                else:
                    WtQ, sWt = fp8_global(W.t(), E4M3)
                    sWt = sWt.expand(W.shape[1], 1).contiguous()
            dX = fp8_scaled_mm(Gq, WtQ, sG, sWt, G.dtype)
        if ctx.needs_input_grad[1]:
            if ctx.fp8_wgrad:
                if GtQ is None:
                    GtQ, sGt = fp8_rowwise(G.t(), E5M2)       # (N, M), a scale per output feature
                dW = fp8_scaled_mm(GtQ, XtQ, sGt, sXt, G.dtype).to(ctx.w_dtype)
            else:
                Xh = (Xq.float() * sX).to(ctx.x_dtype) if ctx.mem_efficient else X
                dW = torch.matmul(G.t(), Xh.to(G.dtype)).to(ctx.w_dtype)
        if want_dbias and dbias is None:
            dbias = G.sum(0)
        return dX, dW, dbias, None, None, None


def linear_fp8_native(x: Tensor, weight: Tensor, bias: Tensor | None, w_rowwise: bool = True,
                      mem_efficient: bool = False, fp8_wgrad: bool = False) -> Tensor:
    """Native-FP8 ``F.linear``: x (*, K), weight (N, K), bias (N,); returns (*, N) in the
    compute dtype. See FP8NativeLinearFunction (``fp8_wgrad``: dW as a float8 GEMM too)."""
    N, K = weight.shape
    check_native_fp8(x, K, N, "native FP8")
    dt = compute_dtype(x)
    X = x.reshape(-1, K).to(dt)
    b = None if bias is None else bias.to(dt)
    Y = FP8NativeLinearFunction.apply(X, weight.to(dt), b, w_rowwise, mem_efficient, fp8_wgrad)
    return Y.reshape(*x.shape[:-1], N)


# --- layers ----------------------------------------------------------------------------------

class _LinearFP8(nn.Linear):
    """nn.Linear's parameters and state_dict; the matmul simulated in FP8 (or native)."""

    _matmul = None  # set by subclasses

    def __init__(self, input_features: int, output_features: int, bias: bool = True,
                 native: bool = False, device=None, dtype=None, fp8_weight_grad: bool = False):
        super().__init__(input_features, output_features, bias, device=device, dtype=dtype)
        if fp8_weight_grad and not native:
            raise ValueError(f"{type(self).__name__}: fp8_weight_grad=True needs native=True (the "
                             f"simulated path keeps bitsandbytes' full-precision weight gradient)")
        self.bsz, self.bsz2 = fp8_block_sizes(input_features, output_features)
        self.native = bool(native)
        self.fp8_weight_grad = bool(fp8_weight_grad)

    @property
    def fw_code(self) -> Tensor:
        """The E4M3 forward codebook on the weight's device (created once per device)."""
        return code_tensor("e4m3", self.weight.device)

    @property
    def bw_code(self) -> Tensor:
        """The E5M2 backward codebook on the weight's device."""
        return code_tensor("e5m2", self.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        name = type(self).__name__
        check_linear_input(x, self.in_features, self.weight, name)
        if self.native:
            return linear_fp8_native(x, self.weight, self.bias, w_rowwise=True,
                                     fp8_wgrad=self.fp8_weight_grad)
        dt = compute_dtype(x)
        W = self.weight.to(dt)
        bias = None if self.bias is None else self.bias.to(dt)
        return type(self)._matmul(x.to(dt), W.t(), "e4m3", "e5m2", None, self.bsz, self.bsz2, bias=bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", native=True" if self.native else "") + \
            (", fp8_weight_grad=True" if self.fp8_weight_grad else "")


class LinearFP8Mixed(_LinearFP8):
    """``LinearFP8Mixed(input_features, output_features, bias=True, native=False,
    fp8_weight_grad=False)``: a drop-in nn.Linear whose forward is matmul_fp8_mixed
    (blockwise E4M3 activations, global E4M3 weight, blockwise E5M2 output gradient; weight
    gradient in full precision). With ``native=True`` the GEMMs run in float8 on the tensor
    cores (see module docstring); ``fp8_weight_grad=True`` (native only) makes the weight
    gradient a float8 GEMM as well (FP8NativeLinearFunction)."""

    _matmul = staticmethod(matmul_fp8_mixed)


class LinearFP8Global(_LinearFP8):
    """``LinearFP8Global(input_features, output_features, bias=True, native=False)``: as
    LinearFP8Mixed with one global scale per operand (matmul_fp8_global)."""

    _matmul = staticmethod(matmul_fp8_global)
