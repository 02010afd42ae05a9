"""The tensor-core 4-bit matmul kernel (qkernels/fourbit/fourbit_mma.cu) on the CPU: its own
source compiled for the host by g++ with the PTX it uses emulated from the ISA's
definitions (tests/emu/fourbit_mma_emu.cpp: the m16n8k16 fragment tables, cp.async groups
completing as early or as late as allowed, a CTA's threads as fibers, CTAs in random order).
It checks the kernel's index work (fragments, staging order, masks, split-K, nested scales)
against the float64 product of the dequantized weight, on shapes small enough for the
emulation; the device tests (tests/test_fourbit_mma.py) check the real thing."""
from __future__ import annotations

import functools
import pathlib
import shutil
import subprocess

import numpy as np
import pytest

from reference import fourbit as ref
from reference.dtypes import bf16_bits_to_float32, float32_to_bf16_bits

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNEL = ROOT / "qkernels" / "fourbit" / "fourbit_mma.cu"
EMU = ROOT / "tests" / "emu"
KC = 256  # fourbit_mma.cu MMA_KC
R = {1: 128, 2: 128, 4: 256, 8: 256}  # rows of W per CTA (MmaShape<NT>::R)


def kernel_body(source: str) -> str:
    """fourbit_mma.cu without its include line and its PTX wrappers, with the dynamic shared
    memory taken from the emulator."""
    start = source.index("// --- PTX wrappers")
    end = source.index("// --- end of PTX wrappers ---")
    body = source[:start] + source[end:]
    body = body.replace('#include "common.cuh"', "")
    decl = "extern __shared__ __align__(16) unsigned char mma_smem[];"
    assert body.count(decl) == 1
    return body.replace(decl, "unsigned char* mma_smem = emu_dynamic_smem;")


@functools.lru_cache(maxsize=1)
def emulator(tmp: str) -> str:
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("needs g++")
    out = pathlib.Path(tmp)
    (out / "kernel_body.inc").write_text(kernel_body(KERNEL.read_text()))
    exe = out / "fourbit_mma_emu"
    subprocess.run([gxx, "-std=c++20", "-O1", "-ffp-contract=off", f"-I{out}", f"-I{EMU}",
                    str(EMU / "fourbit_mma_emu.cpp"), "-o", str(exe)], check=True,
                   capture_output=True, text=True)
    return str(exe)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    try:
        return emulator(str(tmp_path_factory.mktemp("mma_emu")))
    except subprocess.CalledProcessError as e:
        raise AssertionError(f"g++ could not build the emulator:\n{e.stderr[-4000:]}") from None


def to_bits(a32: np.ndarray, dt: int) -> np.ndarray:
    return float32_to_bf16_bits(a32) if dt == 2 else a32.astype(np.float16).view(np.uint16)


def from_bits(bits: np.ndarray, dt: int) -> np.ndarray:
    return bf16_bits_to_float32(bits) if dt == 2 else bits.view(np.float16).astype(np.float32)


def run_emulated(exe, dt, nt, x_bits, packed, state, bias_bits, cps, splits, xoff, seed):
    M, K = x_bits.shape
    N = state.shape[0]
    nested = state.state2 is not None
    head = np.array([dt, nt, int(nested), M, N, K, int(state.blocksize).bit_length() - 1, cps, splits, xoff,
                     int(bias_bits is not None), seed], np.int32)
    parts = [head.tobytes(), np.float32(state.offset if nested else 0.0).tobytes(),
             np.zeros(xoff, np.uint16).tobytes(), x_bits.tobytes(), packed.reshape(-1).tobytes(),
             np.asarray(state.code, np.float32).tobytes()]
    if nested:
        parts += [np.asarray(state.absmax, np.uint8).tobytes(), np.asarray(state.state2.code, np.float32).tobytes(),
                  np.asarray(state.state2.absmax, np.float32).tobytes()]
    else:
        parts.append(np.asarray(state.absmax, np.float32).tobytes())
    if bias_bits is not None:
        parts.append(bias_bits.tobytes())
    res = subprocess.run([exe], input=b"".join(parts), capture_output=True, timeout=600)
    assert res.returncode == 0, res.stderr.decode()
    return np.frombuffer(res.stdout, np.uint16).reshape(M, N)


def split_plan(K: int, splits: int) -> tuple[int, int]:
    """(chunks per split, splits) with no split left empty (the launcher's rule)."""
    chunks = -(-K // KC)
    cps = -(-chunks // splits)
    return cps, -(-chunks // cps)


CASES = [  # (dt, M, N, K, blocksize, quant_type, nested, bias, splits, xoff)
    (2, 2, 130, 256, 64, "nf4", False, True, 1, 0),
    (2, 8, 128, 512, 64, "fp4", True, False, 2, 0),
    (1, 5, 200, 288, 32, "nf4", False, True, 1, 0),        # K % 256 != 0: a masked tail piece
    (2, 16, 260, 800, 4096, "nf4", True, True, 3, 0),      # blocks span rows; split-K 3
    (1, 13, 129, 96, 128, "fp4", False, False, 1, 3),      # misaligned x: element staging
    (2, 27, 300, 544, 256, "nf4", True, True, 2, 1),       # NT 4, WT 2, misaligned, split
    (1, 64, 257, 1056, 64, "nf4", False, True, 4, 0),      # NT 8, split 4 with a short last split
    (2, 33, 64, 64, 64, "fp4", True, False, 1, 0),         # N < R, K < one chunk
]
# x row 1 holds an Inf (CASES[1]) or a NaN (CASES[5]): it poisons that row of out alone
NONFINITE = {1: np.inf, 5: np.nan}


@pytest.mark.parametrize("index", range(len(CASES)),
                         ids=["dt{}-M{}-N{}-K{}-bs{}-{}-{}-b{}-s{}-x{}".format(*c) for c in CASES])
def test_emulated_kernel_matches_float64(emu, index):
    dt, M, N, K, blocksize, quant_type, nested, with_bias, splits, xoff = CASES[index]
    nt = next(v for v in (1, 2, 4, 8) if M <= 8 * v)
    rng = np.random.default_rng(M * 1000 + N + K)
    w = rng.standard_normal((N, K)).astype(np.float32)
    w[3, : K // 2] = 0.0  # an all-zero stretch (a zero scale)
    packed, state = ref.quantize_4bit(w, blocksize, quant_type, nested)
    x32 = from_bits(to_bits(rng.standard_normal((M, K)).astype(np.float32), dt), dt)
    bad = NONFINITE.get(index)
    if bad is not None:
        x32[1, K - 7] = bad
    x_bits = to_bits(x32, dt)
    bias_bits = to_bits(rng.standard_normal(N).astype(np.float32), dt) if with_bias else None
    cps, s_eff = split_plan(K, splits)
    got = from_bits(run_emulated(emu, dt, nt, x_bits, packed, state, bias_bits, cps, s_eff, xoff, seed=M + N),
                    dt)
    # the weight as the kernel must see it: dequantize_4bit's float32 value rounded to x's dtype
    w32 = ref.dequantize_4bit(packed, state, out_dtype="float32").reshape(N, K)
    w_dt = from_bits(to_bits(w32, dt), dt).astype(np.float64)
    with np.errstate(invalid="ignore"):
        exact = x32.astype(np.float64) @ w_dt.T
        mag = np.abs(x32.astype(np.float64)) @ np.abs(w_dt).T
    if with_bias:
        exact += from_bits(bias_bits, dt).astype(np.float64)
    ulp = 2.0 ** -8 if dt == 2 else 2.0 ** -11
    # one rounding to the output dtype (half an ulp, relative) plus float32 sums (tiny)
    tol = ulp * np.abs(exact) + 1e-5 * mag + 1e-30
    keep = np.ones(M, bool)
    if bad is not None:
        keep[1] = False
        assert not np.isfinite(got[1]).any() if np.isnan(bad) else not np.isfinite(got[1]).all()
    got, exact, tol = got[keep], exact[keep], tol[keep]
    err = np.abs(got.astype(np.float64) - exact)
    assert np.isfinite(got).all()
    assert (err <= tol).all(), (np.argwhere(err > tol)[:5], float(err.max()))
