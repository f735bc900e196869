"""The op table: every IR op and every function a spec may call, each described once.

An IR op (:data:`OPS`) has its operand and result kinds, its extent rule, its NumPy
meaning (the reference interpreter's, and the folder's in float64) and, where a spec may
call it by name, its range rule (the hazard analysis's). A spec function
(:data:`FUNCTIONS`) is either such an op or a composition of ops (``clip``, ``mean``,
``norm``, ...) with its own lowering and range rule. The IR verifier, the checker, the
lowering, folding, the interpreter and the hazard analysis read these tables; a
backend keeps one small table from op name to its emission (``codegen/stablehlo.py``),
and ``tests/test_ops.py`` fails when a backend misses an op.

Extent rules: an *elementwise* op's result has the widest extent of its operands
(:func:`optgen.types.widest`); a *reduction* maps each operand extent it accepts to a
result extent (``sum``: tensor -> leaf; ``gsum``: leaf -> step; ``row_mean``: tensor -> row;
``axis_max``: tensor -> axes, and ``axis_min`` back: axes -> tensor);
the matrix ops follow their axes (``matmul``: (a, b) @ (b, c) -> (a, c); see optgen.types).

Adding an elementwise builtin such as ``tanh`` is two lines: an :class:`OpDef` here with
``spec=True`` and a range rule, and its emission in ``codegen/stablehlo.py`` (see
docs/contributing.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from optgen.types import matmul_extent, square_extent, transpose_extent

INF = math.inf
FULL = (-INF, INF)
NONNEG = (0.0, INF)

Interval = tuple[float, float]


def hull(a: Interval, b: Interval) -> Interval:
    """The smallest interval holding both."""
    return (min(a[0], b[0]), max(a[1], b[1]))


def _pick(fn):
    return lambda a, b: (fn(a[0], b[0]), fn(a[1], b[1]))


def round_to_bfloat16(x):
    """``x`` rounded to the nearest bfloat16 (ties to even), kept in its own dtype."""
    x = np.asarray(x)
    return x.astype(ml_dtypes.bfloat16).astype(x.dtype)


def _nonneg_if_nonneg(a: Interval) -> Interval:
    return NONNEG if a[0] >= 0 else FULL


@dataclass(frozen=True)
class Signature:
    """What the checker, the IR verifier and the hazard analysis read of an op or a function.

    ``reduces`` maps each operand extent a reduction accepts to its result's extent; None
    means elementwise (the result has the widest operand extent). ``extent`` replaces both
    rules for the matrix ops: operand extents -> result extent (raising ExtentError).
    ``interval`` bounds the result from the operands' bounds; ``domain_nonneg`` says a
    negative operand gives NaN (the checker warns, W201).
    """

    name: str
    operands: tuple[str, ...]  # the kind of each operand: "float" or "bool"
    doc: str
    reduces: dict[str, str] | None = None
    interval: Callable[..., Interval] = lambda *args: FULL
    domain_nonneg: bool = False
    extent: Callable[..., str] | None = None

    @property
    def arity(self) -> int:
        return len(self.operands)


@dataclass(frozen=True, kw_only=True)
class OpDef(Signature):
    """One IR op: ``numpy`` is its elementwise meaning on NumPy arrays; None marks a *structural*
    op (a reduction, ``size``, a matrix op) that the evaluator applies itself
    (``codegen/evaluate.py``). With ``spec``, a spec may call the op by its name."""

    numpy: Callable | None = None
    result: str = "float"  # the result's kind
    spec: bool = False


# The IR op of each operator of the spec language.
BINARY_OPCODES = {
    "+": "add",
    "-": "sub",
    "*": "mul",
    "/": "div",
    "@": "matmul",
    "^": "pow",
    "<": "lt",
    "<=": "le",
    ">": "gt",
    ">=": "ge",
    "==": "eq",
    "!=": "ne",
    "and": "and",
    "or": "or",
}
UNARY_OPCODES = {"-": "neg", "not": "not"}

F, B = "float", "bool"
_ARRAYS = ("tensor", "row", "col", "cr", "rr", "cc")  # the extents a per-parameter reduction takes
_CMP = dict(result=B)

OPS: dict[str, OpDef] = {
    op.name: op
    for op in (
        # arithmetic (the spec's + - * / ^ and unary -)
        OpDef("add", (F, F), "x + y", numpy=np.add),
        OpDef("sub", (F, F), "x - y", numpy=np.subtract),
        OpDef("mul", (F, F), "x * y", numpy=np.multiply),
        OpDef("div", (F, F), "x / y", numpy=np.divide),
        OpDef("pow", (F, F), "x ^ y", numpy=np.power),
        OpDef("neg", (F,), "-x", numpy=np.negative),
        OpDef(
            "mod",
            (F, F),
            "mod(x, y): C's fmod (the sign of the dividend), as stablehlo.remainder",
            numpy=np.fmod,
            spec=True,
        ),
        # elementwise functions a spec calls by name
        OpDef(
            "sqrt",
            (F,),
            "square root",
            numpy=np.sqrt,
            spec=True,
            interval=lambda a: NONNEG,
            domain_nonneg=True,
        ),
        OpDef(
            "rsqrt",
            (F,),
            "1 / sqrt(x)",
            numpy=lambda x: 1 / np.sqrt(x),
            spec=True,
            interval=lambda a: NONNEG,
            domain_nonneg=True,
        ),
        OpDef("abs", (F,), "absolute value", numpy=np.abs, spec=True, interval=lambda a: NONNEG),
        OpDef("sign", (F,), "-1, 0 or 1", numpy=np.sign, spec=True, interval=lambda a: (-1.0, 1.0)),
        OpDef("exp", (F,), "e^x", numpy=np.exp, spec=True, interval=lambda a: NONNEG),
        OpDef("log", (F,), "natural logarithm", numpy=np.log, spec=True, domain_nonneg=True),
        OpDef(
            "tanh",
            (F,),
            "hyperbolic tangent",
            numpy=np.tanh,
            spec=True,
            interval=lambda a: (-1.0, 1.0),
        ),
        OpDef(
            "bf16",
            (F,),
            "bf16(x): x rounded to bfloat16 (nearest, ties to even) and computed on as before; "
            "a product of two such values may run as a bfloat16 GEMM (docs/fusion.md)",
            numpy=round_to_bfloat16,
            spec=True,
            interval=lambda a: hull(a, tuple(float(round_to_bfloat16(b)) for b in a)),
        ),
        OpDef(
            "max", (F, F), "elementwise maximum", numpy=np.maximum, spec=True, interval=_pick(max)
        ),
        OpDef(
            "min", (F, F), "elementwise minimum", numpy=np.minimum, spec=True, interval=_pick(min)
        ),
        # comparisons and logic
        OpDef("lt", (F, F), "x < y", numpy=np.less, **_CMP),
        OpDef("le", (F, F), "x <= y", numpy=np.less_equal, **_CMP),
        OpDef("gt", (F, F), "x > y", numpy=np.greater, **_CMP),
        OpDef("ge", (F, F), "x >= y", numpy=np.greater_equal, **_CMP),
        OpDef("eq", (F, F), "x == y", numpy=np.equal, **_CMP),
        OpDef("ne", (F, F), "x != y", numpy=np.not_equal, **_CMP),
        OpDef("isfinite", (F,), "neither inf nor nan", numpy=np.isfinite, **_CMP),
        OpDef("and", (B, B), "both", numpy=np.logical_and, **_CMP),
        OpDef("or", (B, B), "either", numpy=np.logical_or, **_CMP),
        OpDef("not", (B,), "negation", numpy=np.logical_not, **_CMP),
        OpDef("select", (B, F, F), "select(c, a, b): a where c holds, else b", numpy=np.where),
        # structural: reductions and sizes, applied by the evaluator
        OpDef(
            "stored",
            (F,),
            "x rounded to the parameter's storage dtype (nearest, ties to even) and computed on "
            "as before: bf16(x) for a bfloat16 parameter, the float16 value for a float16 one, x "
            "itself for float32 and float64 (kahan_sum's rounded p)",
        ),
        OpDef(
            "sum", (F,), "the sum of a parameter's values", reduces=dict.fromkeys(_ARRAYS, "leaf")
        ),
        OpDef(
            "size",
            (F,),
            "the number of elements of a tensor",
            reduces=dict.fromkeys(_ARRAYS, "leaf"),
            spec=True,
            interval=lambda a: NONNEG,
        ),
        OpDef(
            "gsum",
            (F,),
            "the sum over every parameter of a per-leaf value",
            reduces={"leaf": "step"},
        ),
        OpDef(
            "row_mean",
            (F,),
            "mean over each row's elements (a factored parameter's largest axis)",
            reduces={"tensor": "row"},
            spec=True,
            interval=lambda a: a,
        ),
        OpDef(
            "col_mean",
            (F,),
            "mean over each column's elements (a factored parameter's second-largest axis; all of "
            "an unfactored one); on a row value, one number per batch",
            reduces={"tensor": "col", "row": "row"},
            spec=True,
            interval=lambda a: a,
        ),
        OpDef(
            "row_max",
            (F,),
            "maximum over each row's elements (the factored axes of row_mean)",
            reduces={"tensor": "row"},
            spec=True,
            interval=lambda a: a,
        ),
        OpDef(
            "col_max",
            (F,),
            "maximum over each column's elements (the factored axes of col_mean)",
            reduces={"tensor": "col", "row": "row"},
            spec=True,
            interval=lambda a: a,
        ),
        # per-axis statistics: a value per slice of each axis (SM3's cover; optgen.types)
        OpDef(
            "axis_max",
            (F,),
            "for each axis and each index along it, the maximum over that slice of the tensor",
            reduces={"tensor": "axes"},
            spec=True,
            interval=lambda a: a,
        ),
        OpDef(
            "axis_min",
            (F,),
            "at each element, the least of the per-axis values of the slices through it",
            reduces={"axes": "tensor"},
            spec=True,
            interval=lambda a: a,
        ),
        # matrices: a parameter's last two axes, batched over any others (optgen.types)
        OpDef(
            "matmul",
            (F, F),
            "x @ y: the matrix product over the parameter's last two axes",
            extent=matmul_extent,
        ),
        OpDef(
            "transpose",
            (F,),
            "the matrix with its last two axes swapped",
            extent=transpose_extent,
            spec=True,
        ),
        OpDef(
            "eye",
            (F,),
            "eye(a): the identity matrix of a's shape (a Gram-shaped, square value)",
            extent=square_extent,
            spec=True,
            interval=lambda a: (0.0, 1.0),
        ),
        OpDef(
            "dim",
            (),
            "a number of the parameter's shape, named by the op's attribute (DIMS)",
            extent=lambda: "leaf",
        ),
    )
}

# The attributes of `dim`, and the spec's shape constants that read them (one number per parameter,
# known when the step is traced). A parameter's rows and columns are its last two axes; fan_in
# and fan_out are their sizes, as optax.contrib.muon's default dimension numbers read a 2-d kernel.
DIMS = {
    "ndim": "its number of axes",
    "rows": "the size of its second-to-last axis (1 if it has fewer than 2)",
    "cols": "the size of its last axis (1 if it has none)",
}
SHAPE_CONSTANTS = {
    "ndim": "ndim",
    "rows": "rows",
    "cols": "cols",
    "fan_in": "rows",
    "fan_out": "cols",
}


@dataclass(frozen=True, kw_only=True)
class FunctionDef(Signature):
    """A function a spec may call: ``lower(builder, args, loc)`` appends the ops it stands for to an
    :class:`optgen.ir.Builder` and returns the result."""

    lower: Callable


def _lower_op(name):
    return lambda b, args, loc: b.op(name, *args, loc=loc)


def _square_sum(b, x, loc):
    return b.op("sum", b.op("mul", x, x, loc=loc), loc=loc)


def _mean(b, x, loc):
    return b.op("div", b.op("sum", x, loc=loc), b.op("size", x, loc=loc), loc=loc)


_PER_LEAF = dict.fromkeys(_ARRAYS, "leaf")

FUNCTIONS: dict[str, FunctionDef] = {
    op.name: FunctionDef(
        op.name,
        op.operands,
        op.doc,
        op.reduces,
        op.interval,
        op.domain_nonneg,
        op.extent,
        lower=_lower_op(op.name),
    )
    for op in OPS.values()
    if op.spec
} | {
    f.name: f
    for f in (
        FunctionDef(
            "clip",
            (F, F, F),
            "clip(x, lo, hi) = min(max(x, lo), hi)",
            interval=lambda x, lo, hi: (min(max(x[0], lo[0]), hi[0]), min(max(x[1], lo[1]), hi[1])),
            lower=lambda b, a, loc: b.op("min", b.op("max", a[0], a[1], loc=loc), a[2], loc=loc),
        ),
        FunctionDef(
            "where",
            (B, F, F),
            "where(cond, a, b): a where cond holds, else b",
            interval=lambda c, a, b: hull(a, b),
            lower=_lower_op("select"),
        ),
        FunctionDef(
            "sum",
            (F,),
            "sum of a tensor's elements",
            _PER_LEAF,
            _nonneg_if_nonneg,
            lower=_lower_op("sum"),
        ),
        FunctionDef(
            "mean",
            (F,),
            "mean of a tensor's elements",
            _PER_LEAF,
            lambda a: a,
            lower=lambda b, a, loc: _mean(b, a[0], loc),
        ),
        FunctionDef(
            "norm",
            (F,),
            "Euclidean norm of a tensor",
            _PER_LEAF,
            lambda a: NONNEG,
            lower=lambda b, a, loc: b.op("sqrt", _square_sum(b, a[0], loc), loc=loc),
        ),
        FunctionDef(
            "rms",
            (F,),
            "root mean square of a tensor's elements: sqrt(mean(x^2))",
            _PER_LEAF,
            lambda a: NONNEG,
            lower=lambda b, a, loc: b.op(
                "sqrt", _mean(b, b.op("mul", a[0], a[0], loc=loc), loc), loc=loc
            ),
        ),
        FunctionDef(
            "global_sum",
            (F,),
            "the sum over every parameter of x (of its elements, or of one number per parameter): "
            "global_sum(g * d) is the dot product of g and d across all parameters",
            dict.fromkeys(("leaf", *_ARRAYS), "step"),
            _nonneg_if_nonneg,
            lower=lambda b, a, loc: b.op(
                "gsum", a[0] if a[0].type.extent == "leaf" else b.op("sum", a[0], loc=loc), loc=loc
            ),
        ),
        FunctionDef(
            "global_norm",
            (F,),
            "Euclidean norm over every parameter's tensor",
            dict.fromkeys(_ARRAYS, "step"),
            lambda a: NONNEG,
            lower=lambda b, a, loc: b.op(
                "sqrt", b.op("gsum", _square_sum(b, a[0], loc), loc=loc), loc=loc
            ),
        ),
    )
}
