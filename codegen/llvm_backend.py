"""IR -> LLVM IR for one element: the evaluator's backend inside optgen's own CPU loop.

:class:`LoopBackend` plugs into :func:`codegen.evaluate.evaluate` the way the StableHLO
backend does, but each value is one *scalar* LLVM value: the evaluator then describes the
body of a loop over a parameter's elements (``codegen/cpu_kernel.py`` builds the loop).
A value computed from loop-invariant values alone (the per-step scalars: bias
corrections, the learning rate in the parameter's dtype) is emitted before the loop,
once; the rest is emitted in the loop body, where LLVM vectorizes it.

Each op means what it means on XLA: IEEE division and square root, NaN-propagating
``max``/``min`` (``llvm.maximum``), C's ``fmod`` for ``mod``, round-to-nearest-even
when a value is stored in a narrower dtype.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import llvmlite.binding as llvm
import ml_dtypes  # bfloat16 as a NumPy dtype; jax depends on it
import numpy as np
from llvmlite import ir
from optgen.codegen import quantize


class BFloatType(ir.types._BaseFloatType):
    """LLVM's ``bfloat``, which llvmlite's IR builder lacks; only loaded, stored and converted."""

    null = "0.0"
    intrinsic_name = "bf16"

    def __str__(self):
        return "bfloat"


BFloatType._create_instance()

F32, F64, BOOL, U32 = ir.FloatType(), ir.DoubleType(), ir.IntType(1), ir.IntType(32)
# Storage types a kernel loads and stores; computing happens in float32 or float64 (and uint32
# for stochastic rounding's hash, codegen/rounding.py).
LLVM_TYPES = {
    np.dtype(np.float32): F32,
    np.dtype(np.float64): F64,
    np.dtype(np.float16): ir.HalfType(),
    np.dtype(ml_dtypes.bfloat16): BFloatType(),
    np.dtype(np.bool_): BOOL,
    np.dtype(np.uint32): U32,
}
_WIDTH = {"half": 16, "bfloat": 16, "float": 32, "double": 64}


def _intrinsic(b: ir.IRBuilder, name: str, args):
    ty = args[0].type
    fn = b.module.declare_intrinsic(name, [ty], ir.FunctionType(ty, [ty] * len(args)))
    return b.call(fn, args)


def _libm(b: ir.IRBuilder, name: str, args):
    """A call to the C math library (``powf``/``pow``, ``tanhf``/``tanh``), which LLVM knows by
    name.
    """
    ty = args[0].type
    symbol = name + ("f" if ty == F32 else "")
    fn = b.module.globals.get(symbol) or ir.Function(
        b.module, ir.FunctionType(ty, [ty] * len(args)), symbol
    )
    return b.call(fn, args)


def _sign(b: ir.IRBuilder, x):
    # -1, 0 or 1; NaN and signed zeros pass through, as stablehlo.sign
    one, zero = ir.Constant(x.type, 1.0), ir.Constant(x.type, 0.0)
    positive = b.select(b.fcmp_ordered(">", x, zero), one, x)
    return b.select(b.fcmp_ordered("<", x, zero), b.fneg(one), positive)


def _isfinite(b: ir.IRBuilder, x):
    return b.fcmp_ordered("!=", _intrinsic(b, "llvm.fabs", [x]), ir.Constant(x.type, float("inf")))


@functools.cache
def native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 instructions (x86's AVX512-BF16, which AMX CPUs have too;
    ARM's BF16): the conversion from float32 and the dot products a bfloat16 GEMM runs on.
    Elsewhere (AVX2 alone) LLVM lowers the conversion to a call of compiler-rt's
    ``__truncsfbf2``, one element at a time (:func:`define_truncsfbf2`): the loop rounds on the
    bits instead."""
    features = llvm.get_host_cpu_features()
    return bool(features.get("avx512bf16") or features.get("bf16"))


def rounds_bfloat16_in_8_lanes() -> bool:
    """Whether bfloat16 stores round on the bits (:func:`_to_bfloat16`) in registers of 8 float32
    lanes: a CPU with AVX2 but neither AVX-512 nor bfloat16 instructions."""
    features = llvm.get_host_cpu_features()
    return bool(features.get("avx2")) and not features.get("avx512f") and not native_bfloat16()


def _to_bfloat16(b: ir.IRBuilder, x):
    """float32 ``x`` stored in bfloat16, rounded to nearest even; NaN stays a (quiet) NaN.
    Without the instruction, on the bits: adding 0x7FFF plus the kept part's lowest bit to the
    float32's bits, then dropping the low 16, rounds to nearest even (a carry into the exponent
    is the next binade, or infinity past the largest bfloat16). The instruction (x86's
    ``vcvtneps2bf16``) reads a denormal float32 as zero, as XLA's convert on that CPU does; the
    bits keep it, as XLA's convert does where it calls ``__truncsfbf2``."""
    return b.fptrunc(x, BFloatType()) if native_bfloat16() else _bfloat16_on_the_bits(b, x)


def _bfloat16_on_the_bits(b: ir.IRBuilder, x):
    i16 = ir.IntType(16)
    bits = b.bitcast(x, U32)
    high = b.lshr(bits, ir.Constant(U32, 16))
    odd = b.and_(high, ir.Constant(U32, 1))
    rounded = b.lshr(b.add(bits, b.add(odd, ir.Constant(U32, 0x7FFF))), ir.Constant(U32, 16))
    quiet = b.or_(high, ir.Constant(U32, 0x40))
    # NaN tested on the bits: on a float widened from bfloat16 LLVM narrows ``fcmp uno`` to a
    # bfloat compare, which at 16 lanes on AVX2 it lowers to calls of ``__truncsfbf2``
    magnitude = b.and_(bits, ir.Constant(U32, 0x7FFFFFFF))
    nan = b.icmp_unsigned(">", magnitude, ir.Constant(U32, 0x7F800000))
    kept = b.select(nan, quiet, rounded)
    return b.bitcast(b.trunc(kept, i16), BFloatType())


def _narrow(b: ir.IRBuilder, x, target: ir.Type):
    """``x`` stored in the narrower ``target``. A double becomes a 16-bit float through float32,
    rounded twice as XLA:CPU's convert does (LLVM's direct conversion to half would round once,
    in a call of compiler-rt's ``__truncdfhf2``, which this process lacks)."""
    sixteen = isinstance(target, (BFloatType, ir.HalfType))
    narrow = b.fptrunc(x, F32) if sixteen and x.type == F64 else x
    if isinstance(target, BFloatType):
        return _to_bfloat16(b, narrow)
    return b.fptrunc(narrow, target)


# compiler-rt's conversion from float32 to bfloat16, which LLVM calls where the CPU has no
# instruction for it (and where it narrows an operation on values widened from bfloat16)
TRUNCSFBF2 = "__truncsfbf2"


def define_truncsfbf2(module: ir.Module) -> None:
    """Define compiler-rt's ``__truncsfbf2`` in ``module``: float32 to bfloat16, to nearest even,
    on the bits as the loop rounds. The own loop never calls it, but a call of an undefined
    symbol jumps to address zero, and this process lacks compiler-rt. (Only this one: a double
    narrowed to 16 bits, ``__truncdfhf2``, must round once, and ``_narrow`` never asks LLVM for
    it; a definition here would serve every llvmlite user in the process.)"""
    fn = ir.Function(module, ir.FunctionType(BFloatType(), [F32]), TRUNCSFBF2)
    b = ir.IRBuilder(fn.append_basic_block())
    b.ret(_bfloat16_on_the_bits(b, fn.args[0]))


def _round_to_bfloat16(b: ir.IRBuilder, x):
    return b.fpext(_narrow(b, x, BFloatType()), x.type)


def _compare(predicate: str):
    # XLA's comparisons: false on NaN, except != which is true on NaN
    if predicate == "!=":
        return lambda b, x, y: b.fcmp_unordered("!=", x, y)
    return lambda b, x, y: b.fcmp_ordered(predicate, x, y)


# How each elementwise op of the op table (optgen/ops.py) is emitted: builder, operands -> an LLVM
# value.
EMIT = {
    "add": lambda b, x, y: b.fadd(x, y),
    "sub": lambda b, x, y: b.fsub(x, y),
    "mul": lambda b, x, y: b.fmul(x, y),
    "div": lambda b, x, y: b.fdiv(x, y),
    "pow": lambda b, x, y: _intrinsic(b, "llvm.pow", [x, y]),
    "mod": lambda b, x, y: b.frem(x, y),
    "max": lambda b, x, y: _intrinsic(b, "llvm.maximum", [x, y]),
    "min": lambda b, x, y: _intrinsic(b, "llvm.minimum", [x, y]),
    "and": lambda b, x, y: b.and_(x, y),
    "or": lambda b, x, y: b.or_(x, y),
    "not": lambda b, x: b.not_(x),
    "neg": lambda b, x: b.fneg(x),
    "sqrt": lambda b, x: _intrinsic(b, "llvm.sqrt", [x]),
    "rsqrt": lambda b, x: b.fdiv(ir.Constant(x.type, 1.0), _intrinsic(b, "llvm.sqrt", [x])),
    "abs": lambda b, x: _intrinsic(b, "llvm.fabs", [x]),
    "sign": _sign,
    "exp": lambda b, x: _intrinsic(b, "llvm.exp", [x]),
    "log": lambda b, x: _intrinsic(b, "llvm.log", [x]),
    "tanh": lambda b, x: _libm(b, "tanh", [x]),
    "bf16": _round_to_bfloat16,
    "isfinite": _isfinite,
    "lt": _compare("<"),
    "le": _compare("<="),
    "gt": _compare(">"),
    "ge": _compare(">="),
    "eq": _compare("=="),
    "ne": _compare("!="),
    "select": lambda b, c, x, y: b.select(c, x, y),
}


# uint32 arithmetic, wrapping (stochastic rounding's hash).
INTEGER_EMIT = {
    "add": lambda b, x, y: b.add(x, y),
    "mul": lambda b, x, y: b.mul(x, y),
    "xor": lambda b, x, y: b.xor(x, y),
    "and": lambda b, x, y: b.and_(x, y),
    "shr": lambda b, x, y: b.lshr(x, y),
}


class LoopBackend:
    """Backend for :func:`codegen.evaluate.evaluate` whose arrays are one element of a loop.

    ``invariant`` builds before the loop, ``body`` inside it; values given to the evaluator
    that are loop-invariant (the per-step scalars) are listed in ``invariants``. ``index`` is
    the loop's element index (an i64), which stochastic rounding hashes.
    """

    def __init__(self, invariant: ir.IRBuilder, body: ir.IRBuilder, invariants=(), index=None):
        self.invariant, self.body, self.index = invariant, body, index
        self._hoisted = {id(v) for v in invariants}
        self._keep = list(invariants)  # ids stay unique only while the values live

    def _builder_for(self, operands) -> ir.IRBuilder:
        return self.invariant if all(id(v) in self._hoisted for v in operands) else self.body

    def _result(self, value, builder: ir.IRBuilder):
        if builder is self.invariant or isinstance(value, ir.Constant):
            self._hoisted.add(id(value))
            self._keep.append(value)
        return value

    def at(self, loc):
        return nullcontext()

    def dtype_of(self, x) -> np.dtype:
        return next(dtype for dtype, ty in LLVM_TYPES.items() if ty == x.type)

    def constant(self, value, dtype):
        if isinstance(value, bool):
            return self._result(ir.Constant(BOOL, int(value)), self.invariant)
        if np.dtype(dtype) == np.uint32:
            return self._result(ir.Constant(U32, int(value)), self.invariant)
        return self._result(ir.Constant(LLVM_TYPES[np.dtype(dtype)], float(value)), self.invariant)

    def apply(self, opcode, operands):
        builder = self._builder_for(operands)
        return self._result(EMIT[opcode](builder, *operands), builder)

    def convert(self, x, dtype):
        target = LLVM_TYPES[np.dtype(dtype)]
        if x.type == target:
            return x
        builder = self._builder_for([x])
        if target == U32:  # a step number, a float holding an integer
            return self._result(builder.fptoui(x, target), builder)
        widen = _WIDTH[str(target)] > _WIDTH[str(x.type)]
        narrowed = builder.fpext(x, target) if widen else _narrow(builder, x, target)
        return self._result(narrowed, builder)

    def round_to(self, x, dtype):
        return self.convert(self.convert(x, dtype), self.dtype_of(x))

    def integer(self, opcode, operands):
        builder = self._builder_for(operands)
        return self._result(INTEGER_EMIT[opcode](builder, *operands), builder)

    def bitcast(self, x, dtype):
        builder = self._builder_for([x])
        return self._result(builder.bitcast(x, LLVM_TYPES[np.dtype(dtype)]), builder)

    def element_index(self, x):
        return self.body.trunc(self.index, U32)

    # A loop element is a scalar: broadcasting and reshaping leave it as it is.
    def broadcast(self, x, like):
        return x

    def broadcast_to(self, x, shape):
        return x

    def reshape(self, x, shape):
        return x

    def shape_of(self, x):
        return ()

    def barrier(self, xs):
        return xs


# ---- q8 state (codegen/quantize.py): the same operations, in the same order, as its jnp form ----


def dequantize_element(b: ir.IRBuilder, code, scale):
    """An int8 code's float32 value in a block of absmax ``scale``."""
    f = b.fmul(b.sitofp(code, F32), ir.Constant(F32, float(quantize.INVERSE_LEVELS)))
    square = b.fmul(f, f)
    return _intrinsic(b, "llvm.copysign", [b.fmul(b.fmul(square, square), scale), f])


def block_reciprocal(b: ir.IRBuilder, scale):
    """What a block's values are multiplied by before encoding: 1 / scale, or 0 for a zero scale."""
    zero = ir.Constant(F32, 0.0)
    return b.select(b.fcmp_ordered(">", scale, zero), b.fdiv(ir.Constant(F32, 1.0), scale), zero)


def quantize_element(b: ir.IRBuilder, x, reciprocal):
    """The int8 code of float32 ``x`` in a block whose :func:`block_reciprocal` is given."""
    one = ir.Constant(F32, 1.0)
    y = b.fmul(_intrinsic(b, "llvm.fabs", [x]), reciprocal)
    y = b.select(b.fcmp_ordered("<=", y, one), y, one)
    root = _intrinsic(b, "llvm.sqrt", [_intrinsic(b, "llvm.sqrt", [y])])
    magnitude = _intrinsic(b, "llvm.roundeven", [b.fmul(ir.Constant(F32, quantize.LEVELS), root)])
    return b.fptosi(_intrinsic(b, "llvm.copysign", [magnitude, x]), ir.IntType(8))


def absmax_bits(b: ir.IRBuilder, bits, x):
    """The running absmax ``bits`` with ``x`` seen. |x|'s bits as an integer order like |x|
    (a NaN above inf), so the absmax is an integer max, which vectorizes where a float max
    with NaNs would not; its bits are the block's scale."""
    i32 = ir.IntType(32)
    magnitude = b.and_(b.bitcast(x, i32), ir.Constant(i32, 0x7FFFFFFF))
    return _intrinsic(b, "llvm.umax", [bits, magnitude])
