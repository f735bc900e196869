"""The functions a spec may call, with their arity and what they reduce over, and the IR opcode
of each operator."""

from __future__ import annotations

from dataclasses import dataclass


BINARY_OPCODES = {"+": "add", "-": "sub", "*": "mul", "/": "div", "^": "pow", "<": "lt", "<=": "le",
                  ">": "gt", ">=": "ge", "==": "eq", "!=": "ne", "and": "and", "or": "or"}
UNARY_OPCODES = {"-": "neg", "not": "not"}


@dataclass(frozen=True)
class Builtin:
    name: str
    arity: int
    doc: str
    reduces_to: str | None = None  # extent of a reduction's result; None for elementwise
    bool_args: tuple[int, ...] = ()  # argument positions that take a condition


BUILTINS = {b.name: b for b in (
    Builtin("sqrt", 1, "square root"),
    Builtin("rsqrt", 1, "1 / sqrt(x)"),
    Builtin("abs", 1, "absolute value"),
    Builtin("sign", 1, "-1, 0 or 1"),
    Builtin("exp", 1, "e^x"),
    Builtin("log", 1, "natural logarithm"),
    Builtin("max", 2, "elementwise maximum"),
    Builtin("min", 2, "elementwise minimum"),
    Builtin("clip", 3, "clip(x, lo, hi) = min(max(x, lo), hi)"),
    Builtin("where", 3, "where(cond, a, b): a where cond holds, else b", bool_args=(0,)),
    Builtin("sum", 1, "sum of a tensor's elements", reduces_to="leaf"),
    Builtin("mean", 1, "mean of a tensor's elements", reduces_to="leaf"),
    Builtin("norm", 1, "Euclidean norm of a tensor", reduces_to="leaf"),
    Builtin("rms", 1, "root mean square of a tensor's elements: sqrt(mean(x^2))", reduces_to="leaf"),
    Builtin("row_mean", 1, "mean over each row's elements (a factored parameter's largest axis)",
            reduces_to="row"),
    Builtin("col_mean", 1, "mean over each column's elements (a factored parameter's second-largest axis; "
            "all of an unfactored one)", reduces_to="col"),
    Builtin("global_norm", 1, "Euclidean norm over every parameter's tensor", reduces_to="step"),
)}
