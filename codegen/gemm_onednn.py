"""oneDNN's matmul (the library torch's CPU matmul runs on) as the bfloat16 GEMM's handler.

On a CPU with ``avx512_bf16`` but no AMX (AMD EPYC, Zen 4) MKL's ``cblas_gemm_bf16bf16f32``
took 2.2-3x torch's time on each of Muon's products, oneDNN's matmul about torch's
(docs/fusion.md). oneDNN comes from the ``onednn-cpu-gomp`` wheel (``libdnnl.so.3`` in the
interpreter's lib folder, threaded with GNU OpenMP as torch is), loaded with ctypes.

For each product shape, :func:`module` creates once, through oneDNN's C API, the matmul
primitive for

    C (m x n, float32) = op(A) op(B),  A and B bfloat16, row-major; op(X) = X or X^T,

(a transposed operand is the same buffer described with swapped strides) and builds the FFI
handler that, per call, wraps the three XLA buffers in oneDNN memory objects, executes the
primitive on a CPU stream, waits, and frees the wrappers. A failed oneDNN call is an FFI error,
never a silently unwritten result. The primitive, its descriptors, the engine and the stream
live for the process (their addresses are constants of the handler).
"""

from __future__ import annotations

import ctypes
import functools
import sys
import warnings
from pathlib import Path

import llvmlite.binding as llvm
from llvmlite import ir
from optgen.codegen import ffi_runtime as rt

_CPU, _IN_ORDER = 1, 1  # dnnl_engine_kind_t, dnnl_stream_flags_t
_BF16, _F32 = 2, 3  # dnnl_data_type_t
_SRC, _WEIGHTS, _DST = 1, 33, 17  # DNNL_ARG_*
_SYMBOLS = (
    "dnnl_memory_create",
    "dnnl_memory_destroy",
    "dnnl_primitive_execute",
    "dnnl_stream_wait",
)
_I32, _I64, _PTR = ir.IntType(32), ir.IntType(64), ir.PointerType()


class _Handles:
    """The process's oneDNN library, CPU engine and stream."""

    def __init__(self, library: ctypes.CDLL):
        self.library = library
        self.engine, self.stream = ctypes.c_void_p(), ctypes.c_void_p()
        _check(library.dnnl_engine_create(ctypes.byref(self.engine), _CPU, ctypes.c_size_t(0)))
        _check(library.dnnl_stream_create(ctypes.byref(self.stream), self.engine, _IN_ORDER))
        for name in _SYMBOLS:
            llvm.add_symbol(name, ctypes.cast(getattr(library, name), ctypes.c_void_p).value)


def _check(status: int) -> None:
    if status != 0:
        raise RuntimeError(f"oneDNN failed with dnnl_status_t {status}")


@functools.cache
def onednn() -> _Handles | None:
    """oneDNN, from the ``onednn-cpu-gomp`` wheel beside this interpreter, with its engine and
    stream (or None: not installed, or a build without a CPU engine, such as the SYCL one of
    the ``onednn`` wheel, which is said once in a warning)."""
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        path = Path(prefix) / "lib" / "libdnnl.so.3"
        if path.exists():
            try:
                return _Handles(ctypes.CDLL(str(path)))
            except (OSError, AttributeError, RuntimeError) as err:
                warnings.warn(
                    f"{path} cannot run on this CPU ({err}); bfloat16 products use MKL or XLA's "
                    "dot (pip install onednn-cpu-gomp)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return None
    return None


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


def module(gemm, name: str) -> ir.Module:
    """``handler``: C = op(A) op(B) (``gemm``, a :class:`codegen.gemm_kernel.Gemm`) from the
    call's two bfloat16 arguments into its one float32 result, through oneDNN's matmul."""
    handles = onednn()
    lib = handles.library
    descs = [
        _descriptor(lib, gemm.m, gemm.k, _BF16, gemm.trans_a),
        _descriptor(lib, gemm.k, gemm.n, _BF16, gemm.trans_b),
        _descriptor(lib, gemm.m, gemm.n, _F32, False),
    ]
    pd, primitive = ctypes.c_void_p(), ctypes.c_void_p()
    _check(
        lib.dnnl_matmul_primitive_desc_create(
            ctypes.byref(pd), handles.engine, descs[0], descs[1], None, descs[2], None
        )
    )
    _check(lib.dnnl_primitive_create(ctypes.byref(primitive), pd))

    mod = rt.new_module(name)
    create = ir.Function(mod, ir.FunctionType(_I32, [_PTR, _PTR, _PTR, _PTR]), _SYMBOLS[0])
    destroy = ir.Function(mod, ir.FunctionType(_I32, [_PTR]), _SYMBOLS[1])
    execute = ir.Function(mod, ir.FunctionType(_I32, [_PTR, _PTR, _I32, _PTR]), _SYMBOLS[2])
    wait = ir.Function(mod, ir.FunctionType(_I32, [_PTR]), _SYMBOLS[3])
    fn, b = rt.handler(mod)
    args, rets = rt.call_buffers(b, fn.args[0])
    data = [rt.buffer_data(b, args, 0), rt.buffer_data(b, args, 1), rt.buffer_data(b, rets, 0)]
    memories = b.alloca(ir.ArrayType(_PTR, 3))
    arg_type = ir.LiteralStructType([_I32, _PTR])  # dnnl_exec_arg_t
    exec_args = b.alloca(ir.ArrayType(arg_type, 3))
    status = b.alloca(_I32)
    b.store(ir.Constant(_I32, 0), status)
    for i, (desc, pointer, role) in enumerate(
        zip(descs, data, (_SRC, _WEIGHTS, _DST), strict=True)
    ):
        slot = b.gep(memories, [ir.Constant(_I32, 0), ir.Constant(_I32, i)])
        b.store(ir.Constant(_PTR, None), slot)  # destroying a null memory is a no-op
        made = b.call(create, [slot, _constant(desc), _constant(handles.engine), pointer])
        b.store(b.or_(b.load(status, typ=_I32), made), status)
        for field, value in enumerate((ir.Constant(_I32, role), b.load(slot, typ=_PTR))):
            at = [ir.Constant(_I32, x) for x in (0, i, field)]
            b.store(value, b.gep(exec_args, at))
    with b.if_then(b.icmp_signed("==", b.load(status, typ=_I32), ir.Constant(_I32, 0))):
        stream = _constant(handles.stream)
        ran = b.call(execute, [_constant(primitive), stream, ir.Constant(_I32, 3), exec_args])
        b.store(b.or_(ran, b.call(wait, [stream])), status)
    for i in range(3):
        slot = b.gep(memories, [ir.Constant(_I32, 0), ir.Constant(_I32, i)])
        b.call(destroy, [b.load(slot, typ=_PTR)])
    failed = b.icmp_signed("!=", b.load(status, typ=_I32), ir.Constant(_I32, 0))
    b.ret(rt.error_if(b, fn.args[0], failed, f"oneDNN's matmul failed in {name}"))
    return mod
