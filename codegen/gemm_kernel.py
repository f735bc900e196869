"""A bfloat16 matrix product on CPU: oneDNN's matmul or MKL's ``cblas_gemm_bf16bf16f32``,
called through XLA's FFI.

XLA:CPU's dot never reaches the AMX tiles or the ``avx512_bf16`` instructions that a bfloat16
GEMM runs on: on Muon's products it is 7-13x slower than torch's (docs/fusion.md). When a spec
multiplies two values it rounded to bfloat16 (``bf16(x) @ bf16(y)``), the product of their
bfloat16 bits accumulated in float32 is the same number up to the order of the sum, so on CPU
the StableHLO backend hands such a product of two matrices to a GEMM library: a custom call
whose handler (built with the FFI machinery of :mod:`codegen.ffi_runtime`) computes

    C (m x n, float32) = op(A) op(B),  op(X) = X or X^T,  A and B bfloat16, row-major

The libraries are optional (the ``gemm`` extra) and loaded with ctypes from the interpreter's
lib folder, where their wheels put them: oneDNN (``onednn-cpu-gomp``, :mod:`codegen.gemm_onednn`,
the library torch's CPU matmul runs on) where it is there and ``OPTGEN_ONEDNN=1`` asks for it,
else MKL (``mkl``). Without either, on a CPU without bfloat16 instructions (AVX2 alone, where
XLA's float32 dot is faster than MKL's emulated bfloat16 GEMM), on GPU, for an exported step
or a batched product, the product stays XLA's ``dot_general``.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import llvmlite.binding as llvm
import ml_dtypes
import numpy as np
from jaxlib.mlir import ir as mlir_ir
from llvmlite import ir
from optgen.codegen import ffi_runtime as rt
from optgen.codegen import gemm_onednn, llvm_backend

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS_LAYOUT and CBLAS_TRANSPOSE values
_SYMBOL = "cblas_gemm_bf16bf16f32"
_I32, _PTR, _F32 = ir.IntType(32), ir.PointerType(), ir.FloatType()


@functools.cache
def mkl() -> ctypes.CDLL | None:
    """MKL's single dynamic library, from the ``mkl`` wheel beside this interpreter (or None)."""
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        for name in ("libmkl_rt.so.3", "libmkl_rt.so.2"):
            path = Path(prefix) / "lib" / name
            if path.exists():
                library = ctypes.CDLL(str(path))
                llvm.add_symbol(
                    _SYMBOL, ctypes.cast(getattr(library, _SYMBOL), ctypes.c_void_p).value
                )
                return library
    return None


def library() -> str | None:
    """The GEMM library products run on in this process: ``"onednn"``, ``"mkl"`` or None (XLA's
    dot). None on a CPU without bfloat16 instructions (AVX2 alone): MKL emulates its bfloat16
    GEMM there, and Muon's step took 1.45x the time of XLA's dot (docs/fusion.md)."""
    if not llvm_backend.native_bfloat16():
        return None
    if gemm_onednn.onednn() is not None:
        return "onednn"
    return "mkl" if mkl() is not None else None


@dataclass(frozen=True)
class Gemm:
    """One product's shape: C (m x n) = op(A) op(B) with k terms; A is stored (k, m) when
    ``trans_a``, else (m, k); B (n, k) when ``trans_b``, else (k, n)."""

    m: int
    n: int
    k: int
    trans_a: bool
    trans_b: bool
    folded: bool = False  # D = bf16(alpha * op(A) op(B) + beta * C0): :func:`folding_emitter`
    rounded: bool = False  # bf16(C), stored in bfloat16: :func:`rounding_emitter`

    @property
    def name(self) -> str:
        flags = "t" if self.trans_a else "n", "t" if self.trans_b else "n"
        kind = "_fold" if self.folded else "_round" if self.rounded else ""
        return f"optgen_gemm_bf16_{self.m}x{self.n}x{self.k}_{''.join(flags)}{kind}"


def _shape(a, trans_a: bool, b, trans_b: bool) -> tuple[Gemm, tuple, tuple]:
    shape_a = tuple(mlir_ir.RankedTensorType(a.type).shape)
    shape_b = tuple(mlir_ir.RankedTensorType(b.type).shape)
    m, k = shape_a[::-1] if trans_a else shape_a
    n = shape_b[0] if trans_b else shape_b[1]
    return Gemm(m, n, k, trans_a, trans_b), shape_a, shape_b


def emitter(ctx, rounded: bool = False):
    """``emit(a, transposed_a, b, transposed_b)`` for :class:`codegen.stablehlo.StableHLOBackend`:
    the custom call of the float32 product of two bfloat16 matrices (with ``rounded``, of its
    rounding to bfloat16), inside the lowering rule whose context is ``ctx``."""
    dtype = ml_dtypes.bfloat16 if rounded else np.float32

    def emit(a, trans_a: bool, b, trans_b: bool):
        gemm, shape_a, shape_b = _shape(a, trans_a, b, trans_b)
        gemm = Gemm(gemm.m, gemm.n, gemm.k, trans_a, trans_b, rounded=rounded)
        part = ctx.replace(
            avals_in=[jax.core.ShapedArray(s, ml_dtypes.bfloat16) for s in (shape_a, shape_b)],
            avals_out=[jax.core.ShapedArray((gemm.m, gemm.n), dtype)],
        )
        (product,) = jax.ffi.ffi_lowering(target(gemm))(part, a, b)
        return product

    return emit


def rounding_emitter(ctx):
    """``emit(a, transposed_a, b, transposed_b)``, or None where the library cannot round (MKL
    writes float32): the custom call of bf16(op(A) op(B)), stored in bfloat16 by oneDNN's
    matmul, rounded to nearest even once as XLA's convert rounds the float32 product, so the
    same bits without the float32 product's write and read."""
    return emitter(ctx, rounded=True) if library() == "onednn" else None


def folding_emitter(ctx):
    """``emit(a, transposed_a, b, transposed_b, c0, alpha, beta)``, or None where the library
    cannot fold (MKL's beta reads and writes a float32 C): the custom call of

        D (m x n, bfloat16) = bf16(alpha * op(A) op(B) + beta * C0),

    A, B, C0 bfloat16 (C0 m x n, row-major), alpha and beta float32 scalars read at run time;
    one oneDNN matmul (:func:`codegen.gemm_onednn.folded_module`), whose D equals the unfused
    combination up to float32 rounding before the one bfloat16 rounding."""
    if library() != "onednn":
        return None

    def emit(a, trans_a: bool, b, trans_b: bool, c0, alpha, beta):
        gemm, shape_a, shape_b = _shape(a, trans_a, b, trans_b)
        gemm = Gemm(gemm.m, gemm.n, gemm.k, trans_a, trans_b, folded=True)
        bf16 = [jax.core.ShapedArray(s, ml_dtypes.bfloat16) for s in (shape_a, shape_b)]
        scalars = [jax.core.ShapedArray((), np.float32)] * 2
        out = jax.core.ShapedArray((gemm.m, gemm.n), ml_dtypes.bfloat16)
        part = ctx.replace(avals_in=[*bf16, out, *scalars], avals_out=[out])
        (folded,) = jax.ffi.ffi_lowering(target(gemm))(part, a, b, c0, alpha, beta)
        return folded

    return emit


def target(gemm: Gemm, on: str | None = None) -> str:
    """The FFI target of ``gemm`` on library ``on`` (``"onednn"`` or ``"mkl"``; default:
    :func:`library`), registered on first use."""
    on = on or library()
    name = f"{gemm.name}_{on}"
    if on == "onednn" and gemm_onednn.onednn() is not None:
        build = gemm_onednn.folded_module if gemm.folded else gemm_onednn.module
        return rt.register(name, lambda: build(gemm, name))
    # mkl() also tells LLVM where MKL's function is
    if on == "mkl" and mkl() is not None and not (gemm.folded or gemm.rounded):
        return rt.register(name, lambda: _mkl_module(gemm, name))
    raise RuntimeError("the bfloat16 GEMM needs oneDNN or MKL: pip install onednn-cpu-gomp")


def _mkl_module(gemm: Gemm, name: str) -> ir.Module:
    """``handler``: C = op(A) op(B) from the call's two bfloat16 arguments into its one result,
    through MKL's ``cblas_gemm_bf16bf16f32``."""
    module = rt.new_module(name)
    kinds = [_I32] * 6 + [_F32, _PTR, _I32, _PTR, _I32, _F32, _PTR, _I32]
    blas = ir.Function(module, ir.FunctionType(ir.VoidType(), kinds), _SYMBOL)
    fn, b = rt.handler(module)
    args, rets = rt.call_buffers(b, fn.args[0])
    a, bb = rt.buffer_data(b, args, 0), rt.buffer_data(b, args, 1)
    c = rt.buffer_data(b, rets, 0)
    lda = gemm.m if gemm.trans_a else gemm.k  # row-major: a row's length
    ldb = gemm.k if gemm.trans_b else gemm.n
    numbers = [
        _ROW_MAJOR,
        _TRANS if gemm.trans_a else _NO_TRANS,
        _TRANS if gemm.trans_b else _NO_TRANS,
        gemm.m,
        gemm.n,
        gemm.k,
    ]
    b.call(
        blas,
        [ir.Constant(_I32, x) for x in numbers]
        + [ir.Constant(_F32, 1.0), a, ir.Constant(_I32, lda), bb, ir.Constant(_I32, ldb)]
        + [ir.Constant(_F32, 0.0), c, ir.Constant(_I32, gemm.n)],
    )
    b.ret(ir.Constant(_PTR, None))
    return module
