"""IR -> StableHLO ops, built with the MLIR Python bindings that ship in jaxlib.

:class:`StableHLOBackend` plugs into :func:`codegen.evaluate.evaluate` and emits one
StableHLO op per IR op at the current MLIR insertion point, with the op's spec
location (``loc("adamw.spec":14:3)``) so XLA dumps and profiles point at spec lines.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from jax.interpreters import mlir
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import stablehlo as hlo

from optgen.diagnostics import InputError
from optgen.ir import Loc
from optgen.types import DTYPES


def _compare(direction):
    def emit(x, y):
        return hlo.CompareOp(
            x,
            y,
            hlo.ComparisonDirectionAttr.get(direction),
            compare_type=hlo.ComparisonTypeAttr.get("FLOAT"),
        )

    return emit


def _round_to_bfloat16(x):
    """x -> bfloat16 -> x's type: the rounding as two converts (XLA fuses them into its loops)."""
    source = _tensor_type(x)
    narrow = hlo.ConvertOp(ir.RankedTensorType.get(source.shape, ir.BF16Type.get()), x)
    return hlo.ConvertOp(source, narrow.result)


# How each elementwise op of the op table (optgen/ops.py) is emitted: the op's operands -> an MLIR
# op.
EMIT = {
    "add": hlo.AddOp,
    "sub": hlo.SubtractOp,
    "mul": hlo.MulOp,
    "div": hlo.DivOp,
    "pow": hlo.PowOp,
    "max": hlo.MaxOp,
    "min": hlo.MinOp,
    "mod": hlo.RemOp,
    "and": hlo.AndOp,
    "or": hlo.OrOp,
    "neg": hlo.NegOp,
    "sqrt": hlo.SqrtOp,
    "rsqrt": hlo.RsqrtOp,
    "abs": hlo.AbsOp,
    "sign": hlo.SignOp,
    "exp": hlo.ExpOp,
    "log": hlo.LogOp,
    "tanh": hlo.TanhOp,
    "bf16": _round_to_bfloat16,
    "not": hlo.NotOp,
    "isfinite": hlo.IsFiniteOp,
    "lt": _compare("LT"),
    "le": _compare("LE"),
    "gt": _compare("GT"),
    "ge": _compare("GE"),
    "eq": _compare("EQ"),
    "ne": _compare("NE"),
    "select": hlo.SelectOp,
}


# uint32 arithmetic (stochastic rounding's hash, codegen/rounding.py).
INTEGER_EMIT = {
    "add": hlo.AddOp,
    "mul": hlo.MulOp,
    "xor": hlo.XorOp,
    "and": hlo.AndOp,
    "shr": hlo.ShiftRightLogicalOp,
}


def _tensor_type(value) -> ir.RankedTensorType:
    return ir.RankedTensorType(value.type)


class StableHLOBackend:
    """Backend for :func:`codegen.evaluate.evaluate` that emits StableHLO ops.

    ``gemm(a, transposed_a, b, transposed_b)``, where given, emits the float32 product of two
    bfloat16 matrices (``codegen/gemm_kernel.py``); the backend calls it for a product of two
    float32 matrices that ``bf16`` rounded (or their transposes), which it is equal to up to
    the order of the sums. Without it every product is one ``stablehlo.dot_general``.

    ``fold(a, transposed_a, b, transposed_b, c0, alpha, beta)``, where given, emits
    ``bf16(alpha * op(a) op(b) + beta * c0)`` as one call (``gemm_kernel.folding_emitter``); the
    backend calls it for ``bf16(s1 * c0 + s2 * (u @ v))`` of a GEMM product and a rounded
    matrix ``c0`` (either order, either scale absent, scales per step), so that the float32
    product and the combination never travel through memory.

    ``rounding(a, transposed_a, b, transposed_b)``, where given, emits ``bf16(op(a) op(b))`` stored
    in bfloat16 (``gemm_kernel.rounding_emitter``); the backend calls it for ``bf16(u @ v)`` of a
    GEMM product, the same bits as rounding the float32 product without writing it.
    """

    def __init__(self, gemm=None, fold=None, rounding=None):
        self._shapes = {}  # symbolic shape tensors, built once per tensor
        self._gemm, self._fold, self._rounding = gemm, fold, rounding
        self._narrow = {}  # a float32 matrix bf16 rounded -> (its bfloat16 value, transposed?)
        # What a fold reads back: a GEMM product -> its operands as passed to gemm; a scalar
        # broadcast -> the scalar; scalar * x -> (scalar, x); x + y -> (x, y).
        self._products, self._scalars, self._scaled, self._sums = {}, {}, {}, {}

    def at(self, loc: Loc | None):
        return ir.Location.file(loc.file, loc.line, loc.col) if loc else ir.Location.unknown()

    def dtype_of(self, x) -> np.dtype:
        return _numpy_dtype(_tensor_type(x).element_type)

    def constant(self, value, dtype):
        array = np.asarray(value, dtype=bool if isinstance(value, bool) else dtype)
        return mlir.ir_constant(array)

    def apply(self, opcode, operands):
        if opcode == "bf16" and operands[0] in self._sums:
            folded = self._folded(operands[0])
            if folded is not None:
                return folded
        if opcode == "bf16" and self._rounding is not None and operands[0] in self._products:
            # the float32 product's call, now unused, is dead code to XLA
            return self._widened(self._rounding(*self._products[operands[0]]))
        op = EMIT[opcode](*operands)
        if opcode == "bf16" and self._gemm_operand(op.result):
            self._narrow[op.result] = (op.operands[0], False)
        if self._fold is not None:
            self._note(opcode, operands, op.result)
        return op.result

    def _note(self, opcode, operands, result) -> None:
        """Remember a scaled product or rounded matrix, and a sum of two such terms."""
        if opcode == "mul":
            for s, x in (operands, operands[::-1]):
                if s in self._scalars and (x in self._products or x in self._narrow):
                    self._scaled[result] = (self._scalars[s], x)
                    return
        if opcode == "add":
            self._sums[result] = tuple(operands)

    def _folded(self, x):
        """``bf16(x)`` as one folded call where ``x`` is ``s1 * c0 + s2 * product`` (each
        scale optional, in either order), else None."""
        one = None
        terms = [self._scaled.get(t, (None, t)) for t in self._sums[x]]
        for (s2, product), (s1, c0) in (terms, terms[::-1]):
            rounded = self._narrow.get(c0)
            if product not in self._products or rounded is None or rounded[1]:
                continue
            if one is None:
                one = self.constant(1.0, np.float32)
            scales = [one if s is None else self.convert(s, np.float32) for s in (s2, s1)]
            return self._widened(self._fold(*self._products[product], rounded[0], *scales))
        return None

    def _widened(self, narrow):
        """A bfloat16 matrix as the spec's float32 value, remembered as rounded."""
        result = self.convert(narrow, np.float32)
        self._narrow[result] = (narrow, False)
        return result

    def _gemm_operand(self, x) -> bool:
        """Whether ``x`` could be a GEMM operand: a float32 matrix of static shape, with a gemm."""
        shape = _tensor_type(x)
        return (
            self._gemm is not None
            and shape.rank == 2
            and shape.has_static_shape
            and shape.element_type == ir.F32Type.get()
        )

    def convert(self, x, dtype):
        source = _tensor_type(x)
        target = mlir.dtype_to_ir_type(np.dtype(dtype))
        if source.element_type == target:
            return x
        return hlo.ConvertOp(ir.RankedTensorType.get(source.shape, target), x).result

    def round_to(self, x, dtype):
        """``x`` rounded to ``dtype``, kept in its own type: into bfloat16 as one reduce_precision,
        which XLA's GPU pipelines keep where they drop an f32 -> bf16 -> f32 convert pair (their
        simplify-fp-conversions pass, under the default xla_allow_excess_precision); it is the
        pair bit for bit (the same exponent bits). float16 keeps the pair: reduce_precision
        flushes float16's subnormals to zero."""
        if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16):
            return hlo.ReducePrecisionOp(x, exponent_bits=8, mantissa_bits=7).result
        return self.convert(self.convert(x, dtype), self.dtype_of(x))

    def broadcast(self, x, like):
        """Broadcast ``x`` (0-d, or of ``like``'s rank with size-1 axes) to the shape of ``like``
        (static or symbolic).
        """
        shape = _tensor_type(like)
        if shape.has_static_shape:
            return self.broadcast_to(x, shape.shape)
        out = ir.RankedTensorType.get(shape.shape, _tensor_type(x).element_type)
        dims = mlir.dense_int_array(list(range(_tensor_type(x).rank)))
        return hlo.DynamicBroadcastInDimOp(out, x, self._shape_of(like), dims).result

    def broadcast_to(self, x, shape):
        """Broadcast ``x`` (0-d, or of ``shape``'s rank with size-1 axes) to the static
        ``shape``.
        """
        out = ir.RankedTensorType.get(list(shape), _tensor_type(x).element_type)
        result = hlo.BroadcastInDimOp(
            out, x, mlir.dense_int_array(list(range(_tensor_type(x).rank)))
        ).result
        if self._fold is not None and _tensor_type(x).rank == 0:
            self._scalars[result] = x
        return result

    def reshape(self, x, shape):
        return hlo.ReshapeOp(
            ir.RankedTensorType.get(list(shape), _tensor_type(x).element_type), x
        ).result

    def shape_of(self, x):
        return tuple(_tensor_type(x).shape)

    def slice(self, x, start, stop):
        """``x[start:stop]`` of a vector."""
        return hlo.SliceOp(x, [start], [stop], [1]).result

    def concatenate(self, xs):
        """Vectors end to end."""
        return hlo.ConcatenateOp(xs, 0).result

    def reduce_sum(self, x, axes=None):
        """The sum of ``x`` over ``axes`` (default: all), which are dropped."""
        return self._reduce(x, axes, 0.0, hlo.AddOp)

    def reduce_max(self, x, axes):
        """The maximum of ``x`` over ``axes``, kept as size-1 axes (static shapes)."""
        if not axes:
            return x
        kept = [1 if axis in axes else n for axis, n in enumerate(_tensor_type(x).shape)]
        return self.reshape(self._reduce(x, axes, -np.inf, hlo.MaxOp), kept)

    def _reduce(self, x, axes, init: float, combine):
        source = _tensor_type(x)
        axes = list(range(source.rank)) if axes is None else list(axes)
        kept = [n for axis, n in enumerate(source.shape) if axis not in axes]
        result = ir.RankedTensorType.get(kept, source.element_type)
        scalar = ir.RankedTensorType.get([], source.element_type)
        start = mlir.ir_constant(np.full((), init, self.dtype_of(x)))
        reduce = hlo.ReduceOp([result], [x], [start], mlir.dense_int_array(axes))
        block = reduce.body.blocks.append(scalar, scalar)
        with ir.InsertionPoint(block):
            hlo.ReturnOp([combine(*block.arguments).result])
        return reduce.result

    def mean(self, x, axes):
        """The mean of ``x`` over ``axes``, kept as size-1 axes (of a static shape, or all axes)."""
        if not axes:
            return x
        source = _tensor_type(x)
        total = self.reduce_sum(x, axes)
        if len(axes) == source.rank:
            count = self.size(x, self.dtype_of(x))
        else:
            count = self.constant(float(np.prod([source.shape[a] for a in axes])), self.dtype_of(x))
            count = self.broadcast_to(count, _tensor_type(total).shape)
        kept = [1 if axis in axes else n for axis, n in enumerate(source.shape)]
        return self.reshape(hlo.DivOp(total, count).result, kept)

    def size(self, x, dtype):
        shape = _tensor_type(x)
        if shape.has_static_shape:
            return self.constant(float(np.prod(shape.shape)), dtype)
        total = self.constant(1.0, dtype)
        for dim in range(shape.rank):
            extent = self.convert(hlo.GetDimensionSizeOp(x, dim).result, dtype)
            total = hlo.MulOp(total, extent).result
        return total

    def barrier(self, xs):
        """The same values, hidden from XLA's CSE (the barrier itself costs nothing at run time)."""
        return list(hlo.OptimizationBarrierOp(xs).results) if xs else []

    def matmul(self, x, y):
        """``x @ y`` over the last two axes, batched over the leading ones (stablehlo.dot_general;
        a product of two bfloat16-rounded matrices through ``gemm``)."""
        if x in self._narrow and y in self._narrow:
            operands = (*self._narrow[x], *self._narrow[y])
            product = self._gemm(*operands)
            self._products[product] = operands
            return product
        lhs, rhs = _tensor_type(x), _tensor_type(y)
        batch = list(range(lhs.rank - 2))
        result = ir.RankedTensorType.get([*lhs.shape[:-1], rhs.shape[-1]], lhs.element_type)
        dims = hlo.DotDimensionNumbers.get(
            lhs_batching_dimensions=batch,
            rhs_batching_dimensions=batch,
            lhs_contracting_dimensions=[lhs.rank - 1],
            rhs_contracting_dimensions=[rhs.rank - 2],
        )
        return hlo.DotGeneralOp(result, x, y, dims).result

    def transpose(self, x):
        """``x`` with its last two axes swapped."""
        source = _tensor_type(x)
        order = [*range(source.rank - 2), source.rank - 1, source.rank - 2]
        result = hlo.TransposeOp(x, mlir.dense_int_array(order)).result
        if x in self._narrow:  # a GEMM reads the transpose in place
            narrow, transposed = self._narrow[x]
            self._narrow[result] = (narrow, not transposed)
        return result

    def dim(self, x, axis, dtype):
        return self.convert(hlo.GetDimensionSizeOp(x, axis).result, dtype)

    def integer(self, opcode, operands):
        return INTEGER_EMIT[opcode](*operands).result

    def bitcast(self, x, dtype):
        source = _tensor_type(x)
        target = ir.RankedTensorType.get(source.shape, mlir.dtype_to_ir_type(np.dtype(dtype)))
        return hlo.BitcastConvertOp(target, x).result

    def element_index(self, x):
        """Each element's position in ``x`` read in row-major order, as uint32."""
        source = _tensor_type(x)
        u32 = mlir.dtype_to_ir_type(np.dtype(np.uint32))
        if source.has_static_shape:
            flat = ir.RankedTensorType.get([int(np.prod(source.shape))], u32)
            index = hlo.IotaOp(flat, 0).result
            return index if source.rank == 1 else self.reshape(index, source.shape)
        if source.rank != 1:
            raise InputError(
                "stochastic rounding numbers the elements of a parameter with a symbolic shape "
                f"only for vectors, and this one has {source.rank} axes",
                hint="export with sizes rather than names (--shape 64,32), or use a vector",
                code="E420",
            )
        vector = ir.RankedTensorType.get(source.shape, u32)
        return hlo.DynamicIotaOp(vector, self._shape_of(x), 0).result

    def _shape_of(self, x):
        if x not in self._shapes:
            i32 = ir.RankedTensorType.get([1], ir.IntegerType.get_signless(32))
            dims = [
                hlo.ReshapeOp(i32, hlo.GetDimensionSizeOp(x, d).result).result
                for d in range(_tensor_type(x).rank)
            ]
            self._shapes[x] = hlo.ConcatenateOp(dims, 0).result
        return self._shapes[x]


def _numpy_dtype(element: ir.Type) -> np.dtype:
    for dtype in (*DTYPES.values(), np.int32, np.uint32, np.bool_):
        if mlir.dtype_to_ir_type(np.dtype(dtype)) == element:
            return np.dtype(dtype)
    raise TypeError(f"optgen cannot compute with element type {element}")
