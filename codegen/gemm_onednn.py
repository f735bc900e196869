"""oneDNN's matmul (the library torch's CPU matmul runs on) as the bfloat16 GEMM's handler.

On a CPU with ``avx512_bf16`` but no AMX (AMD EPYC, Zen 4) MKL's ``cblas_gemm_bf16bf16f32``
took 2.2-3x torch's time on each of Muon's products, oneDNN's matmul about torch's
(docs/fusion.md). oneDNN comes from the ``onednn-cpu-gomp`` wheel (``libdnnl.so.3`` in the
interpreter's lib folder, threaded with GNU OpenMP as torch is), loaded with ctypes.

XLA runs independent custom calls at once, on its own threads. oneDNN's default build shares
one scratchpad between primitives, and a primitive may not run on a thread other than the one
that created it: concurrent products returned whole matrices of NaN (a process-wide mutex
around each product fixed that but deadlocked now and then). So every primitive is created in
oneDNN's *user* scratchpad mode, and each call brings its own scratchpad and stream; that mode is
thread-safe as long as no scratchpad is shared by two executions. That is not yet seen to end
the NaN on a CPU with ``avx512_bf16`` (none was at hand; on AVX2 alone oneDNN has no bfloat16
matmul), so oneDNN still runs only with ``OPTGEN_ONEDNN=1``.

For each product shape, :func:`module` creates once, through oneDNN's C API, the matmul
primitive for

    C (m x n, float32) = op(A) op(B),  A and B bfloat16, row-major; op(X) = X or X^T,

(a transposed operand is the same buffer described with swapped strides), or for bf16(C)
stored in bfloat16 (a spec's ``bf16(u @ v)``, such as Muon's Gram matrix), and builds the FFI
handler that, per call, allocates the primitive's scratchpad and a CPU stream, wraps the XLA
buffers in oneDNN memory objects, executes the primitive, waits, and frees all of it. A failed
oneDNN call (or allocation) is an FFI error, never a silently unwritten result. The primitive,
its descriptors and the engine live for the process (their addresses are constants of the
handler).

:func:`folded_module` builds the same call with a rounded combination folded in (torch's
``addmm(C0, A, B, beta=beta, alpha=alpha)``): D = bf16(alpha * op(A) op(B) + beta * C0), its
float32 product combined by the matmul's binary post-ops and stored once in bfloat16.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import llvmlite.binding as llvm
from llvmlite import ir
from optgen.codegen import ffi_runtime as rt

_CPU, _IN_ORDER = 1, 1  # dnnl_engine_kind_t, dnnl_stream_flags_t
_BF16, _F32 = 2, 3  # dnnl_data_type_t
_SRC, _SRC_1, _WEIGHTS, _DST, _SCRATCHPAD = 1, 2, 33, 17, 80  # DNNL_ARG_*
_USER_SCRATCHPAD, _QUERY_SCRATCHPAD_MD = 1, 136  # dnnl_scratchpad_mode_user, dnnl_query_t
_POST_OP_BASE = 32768  # DNNL_ARG_ATTR_MULTIPLE_POST_OP_BASE
_ADD, _MUL = 0x1FFF0, 0x1FFF1  # dnnl_binary_add, dnnl_binary_mul
_SYMBOLS = (
    "dnnl_memory_create",
    "dnnl_memory_destroy",
    "dnnl_primitive_execute",
    "dnnl_stream_create",
    "dnnl_stream_destroy",
    "dnnl_stream_wait",
)
_I32, _I64, _PTR, _F = ir.IntType(32), ir.IntType(64), ir.PointerType(), ir.FloatType()


class _Handles:
    """The process's oneDNN library and CPU engine."""

    def __init__(self, library: ctypes.CDLL):
        self.library = library
        self.engine = ctypes.c_void_p()
        _check(library.dnnl_engine_create(ctypes.byref(self.engine), _CPU, ctypes.c_size_t(0)))
        library.dnnl_primitive_desc_query_md.restype = ctypes.c_void_p
        library.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
        for name in _SYMBOLS:
            llvm.add_symbol(name, ctypes.cast(getattr(library, name), ctypes.c_void_p).value)


def _check(status: int) -> None:
    if status != 0:
        raise RuntimeError(f"oneDNN failed with dnnl_status_t {status}")


@functools.cache
def onednn() -> _Handles | None:
    """oneDNN, from the ``onednn-cpu-gomp`` wheel beside this interpreter, with its engine (or
    None: not asked for with ``OPTGEN_ONEDNN=1``; not installed; a CPU it has no bfloat16 matmul
    for, such as one with AVX2 but neither ``avx512_bf16`` nor AMX, where MKL emulates it; or a
    build without a CPU engine, such as the SYCL one of the ``onednn`` wheel, which is said once
    in a warning)."""
    # opt-in until the user scratchpad is seen to end the NaN on a CPU with bf16 (module docstring)
    if os.environ.get("OPTGEN_ONEDNN") != "1":
        return None
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        path = Path(prefix) / "lib" / "libdnnl.so.3"
        if path.exists():
            try:
                handles = _Handles(ctypes.CDLL(str(path)))
                return handles if _has_bf16_matmul(handles) else None
            except (OSError, AttributeError, RuntimeError) as err:
                warnings.warn(
                    f"{path} cannot run on this CPU ({err}); bfloat16 products use MKL or XLA's "
                    "dot (pip install onednn-cpu-gomp)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return None
    return None


def _has_bf16_matmul(handles: _Handles) -> bool:
    """Whether oneDNN implements a bfloat16 matmul on this CPU (a primitive descriptor for a
    small one can be made; dnnl_unimplemented where the CPU lacks the instructions)."""
    lib = handles.library
    bf16 = _descriptor(lib, 16, 16, _BF16, False)
    f32 = _descriptor(lib, 16, 16, _F32, False)
    pd = ctypes.c_void_p()
    made = lib.dnnl_matmul_primitive_desc_create(
        ctypes.byref(pd), handles.engine, bf16, bf16, None, f32, None
    )
    for desc in (bf16, f32):
        _check(lib.dnnl_memory_desc_destroy(desc))
    if made == 0:
        _check(lib.dnnl_primitive_desc_destroy(pd))
    return made == 0


def _descriptor(library, rows: int, cols: int, dtype: int, transposed: bool) -> ctypes.c_void_p:
    """A 2-d memory descriptor of op(X) (rows x cols); X^T is X's row-major buffer read by
    columns."""
    dims = (ctypes.c_int64 * 2)(rows, cols)
    strides = (ctypes.c_int64 * 2)(*((1, rows) if transposed else (cols, 1)))
    desc = ctypes.c_void_p()
    _check(
        library.dnnl_memory_desc_create_with_strides(ctypes.byref(desc), 2, dims, dtype, strides)
    )
    return desc


def _constant(handle: ctypes.c_void_p):
    return ir.Constant(_I64, handle.value).inttoptr(_PTR)


class _Primitive(NamedTuple):
    """A created primitive and the scratchpad each execution of it must bring."""

    handle: ctypes.c_void_p
    scratchpad: ctypes.c_void_p  # its memory descriptor (owned by the primitive descriptor)
    scratchpad_bytes: int


def _matmul(handles: _Handles, descs, post_ops=()) -> _Primitive:
    """The matmul primitive ``descs[2] = descs[0] @ descs[1]``, then each binary post-op
    ``(algorithm, src1 descriptor)`` in turn, computed in float32 and stored once in the
    destination's dtype; in user scratchpad mode (module docstring)."""
    lib = handles.library
    attr, chain = ctypes.c_void_p(), ctypes.c_void_p()
    _check(lib.dnnl_primitive_attr_create(ctypes.byref(attr)))
    _check(lib.dnnl_primitive_attr_set_scratchpad_mode(attr, _USER_SCRATCHPAD))
    _check(lib.dnnl_post_ops_create(ctypes.byref(chain)))
    for algorithm, desc in post_ops:
        _check(lib.dnnl_post_ops_append_binary(chain, algorithm, desc))
    _check(lib.dnnl_primitive_attr_set_post_ops(attr, chain))
    pd, primitive = ctypes.c_void_p(), ctypes.c_void_p()
    _check(
        lib.dnnl_matmul_primitive_desc_create(
            ctypes.byref(pd), handles.engine, descs[0], descs[1], None, descs[2], attr
        )
    )
    _check(lib.dnnl_primitive_create(ctypes.byref(primitive), pd))
    scratchpad = ctypes.c_void_p(lib.dnnl_primitive_desc_query_md(pd, _QUERY_SCRATCHPAD_MD, 0))
    return _Primitive(primitive, scratchpad, lib.dnnl_memory_desc_get_size(scratchpad))


def _post_op(index: int) -> int:
    """DNNL_ARG_ATTR_MULTIPLE_POST_OP(index) | DNNL_ARG_SRC_1 (oneDNN 3.2's numbering)."""
    return _POST_OP_BASE * (index + 1) | _SRC_1


def _declare(mod: ir.Module) -> dict:
    kinds = {
        "dnnl_memory_create": [_PTR, _PTR, _PTR, _PTR],
        "dnnl_memory_destroy": [_PTR],
        "dnnl_primitive_execute": [_PTR, _PTR, _I32, _PTR],
        "dnnl_stream_create": [_PTR, _PTR, _I32],
        "dnnl_stream_destroy": [_PTR],
        "dnnl_stream_wait": [_PTR],
    }
    fns = {name: ir.Function(mod, ir.FunctionType(_I32, k), name) for name, k in kinds.items()}
    fns["aligned_alloc"] = ir.Function(mod, ir.FunctionType(_PTR, [_I64, _I64]), "aligned_alloc")
    fns["free"] = ir.Function(mod, ir.FunctionType(ir.VoidType(), [_PTR]), "free")
    return fns


def _execute(b: ir.IRBuilder, fns: dict, handles: _Handles, primitive: _Primitive, arguments):
    """Emit one execution of ``primitive`` on ``arguments``, ``(role, descriptor, pointer)``
    each: allocate this call's scratchpad and stream, wrap each buffer in a oneDNN memory
    object, execute, wait, free it all. Returns the i32 status (0: done)."""
    status = b.alloca(_I32)
    stream = b.alloca(_PTR)
    b.store(ir.Constant(_PTR, None), stream)  # destroying a null stream is a no-op
    engine = _constant(handles.engine)
    flags = ir.Constant(_I32, _IN_ORDER)
    b.store(b.call(fns["dnnl_stream_create"], [stream, engine, flags]), status)
    scratchpad = ir.Constant(_PTR, None)
    if primitive.scratchpad_bytes:
        size = -(-primitive.scratchpad_bytes // 64) * 64  # aligned_alloc wants a multiple
        scratchpad = b.call(fns["aligned_alloc"], [ir.Constant(_I64, 64), ir.Constant(_I64, size)])
        unallocated = b.zext(b.icmp_unsigned("==", scratchpad, ir.Constant(_PTR, None)), _I32)
        b.store(b.or_(b.load(status, typ=_I32), unallocated), status)
        arguments = [*arguments, (_SCRATCHPAD, primitive.scratchpad, scratchpad)]
    count = len(arguments)
    memories = b.alloca(ir.ArrayType(_PTR, count))
    exec_args = b.alloca(ir.ArrayType(ir.LiteralStructType([_I32, _PTR]), count))  # dnnl_exec_arg_t
    for i, (role, desc, pointer) in enumerate(arguments):
        slot = b.gep(memories, [ir.Constant(_I32, 0), ir.Constant(_I32, i)])
        b.store(ir.Constant(_PTR, None), slot)  # destroying a null memory is a no-op
        made = b.call(fns["dnnl_memory_create"], [slot, _constant(desc), engine, pointer])
        b.store(b.or_(b.load(status, typ=_I32), made), status)
        for field, value in enumerate((ir.Constant(_I32, role), b.load(slot, typ=_PTR))):
            at = [ir.Constant(_I32, x) for x in (0, i, field)]
            b.store(value, b.gep(exec_args, at))
    with b.if_then(b.icmp_signed("==", b.load(status, typ=_I32), ir.Constant(_I32, 0))):
        on = b.load(stream, typ=_PTR)
        ran = b.call(
            fns["dnnl_primitive_execute"],
            [_constant(primitive.handle), on, ir.Constant(_I32, count), exec_args],
        )
        b.store(b.or_(ran, b.call(fns["dnnl_stream_wait"], [on])), status)
    for i in range(count):
        slot = b.gep(memories, [ir.Constant(_I32, 0), ir.Constant(_I32, i)])
        b.call(fns["dnnl_memory_destroy"], [b.load(slot, typ=_PTR)])
    b.call(fns["free"], [scratchpad])  # free(NULL) is a no-op
    b.call(fns["dnnl_stream_destroy"], [b.load(stream, typ=_PTR)])
    return b.load(status, typ=_I32)


def module(gemm, name: str) -> ir.Module:
    """``handler``: C = op(A) op(B) (``gemm``, a :class:`codegen.gemm_kernel.Gemm`) from the
    call's two bfloat16 arguments into its one result, through oneDNN's matmul: float32, or
    with ``gemm.rounded`` bf16(C), the float32 sums rounded once to nearest even as they are
    stored (XLA's convert of the float32 C, without C's float32 write and read)."""
    handles = onednn()
    lib = handles.library
    descs = [
        _descriptor(lib, gemm.m, gemm.k, _BF16, gemm.trans_a),
        _descriptor(lib, gemm.k, gemm.n, _BF16, gemm.trans_b),
        _descriptor(lib, gemm.m, gemm.n, _BF16 if gemm.rounded else _F32, False),
    ]
    primitive = _matmul(handles, descs)
    mod = rt.new_module(name)
    fns = _declare(mod)
    fn, b = rt.handler(mod)
    args, rets = rt.call_buffers(b, fn.args[0])
    data = [rt.buffer_data(b, args, 0), rt.buffer_data(b, args, 1), rt.buffer_data(b, rets, 0)]
    operands = list(zip((_SRC, _WEIGHTS, _DST), descs, data, strict=True))
    status = _execute(b, fns, handles, primitive, operands)
    failed = b.icmp_signed("!=", status, ir.Constant(_I32, 0))
    b.ret(rt.error_if(b, fn.args[0], failed, f"oneDNN's matmul failed in {name}"))
    return mod


def folded_module(gemm, name: str) -> ir.Module:
    """``handler``: D = bf16(alpha * op(A) op(B) + beta * C0) from the call's arguments
    (A, B, C0: bfloat16; alpha, beta: float32 scalars) into its one bfloat16 result, in one
    oneDNN matmul whose binary post-ops combine the float32 product P before the one rounding:

        D = bf16(beta * (C0 + q * P)),  q = alpha / beta   (float32, when beta != 0 and q finite)
        D = bf16(alpha * P)                                (when beta == 0)

    beta * C0 cannot be a post-op (oneDNN scales only the accumulator), hence the factor beta;
    each float32 operation rounds once, so D is the unfused bf16(beta * C0 + alpha * P) up to
    float32 rounding (a few float32 ulps of the terms) before the bfloat16 rounding. An
    |alpha / beta| beyond float32 is an FFI error, never a silently wrong number."""
    handles = onednn()
    lib = handles.library
    scalar = _descriptor(lib, 1, 1, _F32, False)  # broadcast over the product
    descs = [
        _descriptor(lib, gemm.m, gemm.k, _BF16, gemm.trans_a),
        _descriptor(lib, gemm.k, gemm.n, _BF16, gemm.trans_b),
        _descriptor(lib, gemm.m, gemm.n, _BF16, False),
    ]
    chain = ((_MUL, scalar), (_ADD, descs[2]), (_MUL, scalar))
    fused, scaled = _matmul(handles, descs, chain), _matmul(handles, descs, chain[:1])

    mod = rt.new_module(name)
    fns = _declare(mod)
    fn, b = rt.handler(mod)
    args, rets = rt.call_buffers(b, fn.args[0])
    a, bb, c0, alpha_at, beta_at = (rt.buffer_data(b, args, i) for i in range(5))
    d = rt.buffer_data(b, rets, 0)
    operands = [(_SRC, descs[0], a), (_WEIGHTS, descs[1], bb), (_DST, descs[2], d)]
    alpha, beta = b.load(alpha_at, typ=_F), b.load(beta_at, typ=_F)
    q = b.fdiv(alpha, beta)
    q_at = b.alloca(_F)
    b.store(q, q_at)
    status = b.alloca(_I32)
    b.store(ir.Constant(_I32, -1), status)  # unless a branch below runs
    finite = b.fcmp_ordered("==", b.fsub(q, q), ir.Constant(_F, 0.0))  # false for inf, nan
    with b.if_else(b.fcmp_ordered("==", beta, ir.Constant(_F, 0.0))) as (no_c0, with_c0):
        with no_c0:
            post = [(_post_op(0), scalar, alpha_at)]
            b.store(_execute(b, fns, handles, scaled, operands + post), status)
        with with_c0, b.if_then(finite):
            post = [(_post_op(0), scalar, q_at), (_post_op(1), descs[2], c0)]
            post.append((_post_op(2), scalar, beta_at))
            b.store(_execute(b, fns, handles, fused, operands + post), status)
    failed = b.icmp_signed("!=", b.load(status, typ=_I32), ir.Constant(_I32, 0))
    message = f"oneDNN's matmul failed in {name} (or |alpha / beta| is beyond float32)"
    b.ret(rt.error_if(b, fn.args[0], failed, message))
    return mod
