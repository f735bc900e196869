"""Numeric hazards the checker can see: values outside declared ranges, and what can go wrong
in floating point that the spec's own declarations already reveal.

An interval analysis over the update: each value gets bounds ``[lo, hi]`` (closed, possibly
infinite) from number literals, hyperparameter ranges (``hyper b2 = 0.999 in [0, 1)``),
``t >= 1`` and the functions applied. States are bounded by a fixpoint: start from the
initial value, run the update, widen every bound that moved to infinity, repeat. With
that, ``nu = b2 * nu + (1 - b2) * g^2`` is known to stay ``>= 0`` once ``b2`` is declared
in ``[0, 1)``, and ``sqrt(nu_hat + eps_root)`` is safe once ``eps_root >= 0``.

- a hyperparameter default outside its range: error E217;
- a division by a value that is always zero: error E218;
- ``sqrt``, ``rsqrt`` or ``log`` of a value that can be negative (NaN in float): warning W201;
- a value that can be negative to a constant non-integer power (NaN in float): warning W202;
- a constant expression that overflows float64 (``10^400``, ``exp(1000)``, ``log(0)``): error
  E223; ``0^-1`` divides by zero: error E218. Constant parts are evaluated exactly, with each
  op's NumPy meaning from the op table (the interpreter's and folding's).
"""

from __future__ import annotations

import math

import numpy as np

from optgen import syntax as ast
from optgen.diagnostics import SpecError
from optgen.ops import (
    BINARY_OPCODES,
    FULL,
    FUNCTIONS,
    INF,
    NONNEG,
    OPS,
    SHAPE_CONSTANTS,
    UNARY_OPCODES,
    hull,
)


def analyze(spec: ast.Spec) -> tuple[SpecError, ...]:
    """Raise the first hazard that is an error; return the warnings, in source order."""
    for hyper in spec.hypers:
        if hyper.range is not None and not hyper.range.contains(hyper.default):
            raise SpecError(
                f"the default {hyper.default:g} of '{hyper.name.id}' is outside its range "
                f"{hyper.range}",
                spec.source,
                hyper.range.span,
                "change the default or the range",
                code="E217",
            )
    return _Intervals(spec).run()


def _clean(lo: float, hi: float) -> tuple[float, float]:
    # inf - inf and 0 * inf are NaN; a bound we cannot tell is infinite.
    return (-INF if math.isnan(lo) else lo, INF if math.isnan(hi) else hi)


def _mul(a, b):
    products = [x * y for x in a for y in b]
    products = [0.0 if math.isnan(p) else p for p in products]  # 0 * inf: a zero factor wins
    return (min(products), max(products))


class _Intervals:
    def __init__(self, spec: ast.Spec):
        self.spec = spec
        self.warnings: dict[tuple, SpecError] = {}
        self.report = False  # hazards are reported on the last pass only, once states are stable

    def run(self) -> tuple[SpecError, ...]:
        spec = self.spec
        base = {"p": FULL, "g": FULL, "t": (1.0, INF)} | {name: NONNEG for name in SHAPE_CONSTANTS}
        base |= {h.name.id: (h.range.lo, h.range.hi) if h.range else FULL for h in spec.hypers}
        states = {s.name.id: self.expr(s.init, base) for s in spec.states}
        for _ in range(2 * len(states) + 1):  # each round widens at least one bound, or stops
            env = self.block(spec.body, base | states)
            moved = {
                name: tuple(
                    b if b == old else w
                    for b, old, w in zip(hull(iv, env.get(name, iv)), iv, (-INF, INF), strict=True)
                )
                for name, iv in states.items()
            }
            if moved == states:
                break
            states = moved
        self.report = True
        for s in spec.states:
            self.expr(s.init, base)
        self.block(spec.body, base | states)
        return tuple(self.warnings[key] for key in sorted(self.warnings))

    def block(self, stmts, env: dict) -> dict:
        env = dict(env)
        for stmt in stmts:
            if isinstance(stmt, ast.Assign):
                env[stmt.target.id] = self.expr(stmt.value, env)
            elif isinstance(stmt, ast.Repeat):
                # a bound that moves in a second pass may move every pass
                once = self.block(stmt.body, env)
                twice = self.block(stmt.body, once)
                env = {
                    name: iv
                    if once.get(name) == iv
                    else (
                        -INF if iv[0] != once[name][0] else iv[0],
                        INF if iv[1] != once[name][1] else iv[1],
                    )
                    for name, iv in twice.items()
                }
            else:  # options are not known here: either branch may run
                then, orelse = self.block(stmt.then, env), self.block(stmt.orelse, env)
                for name in then.keys() | orelse.keys():
                    env[name] = hull(
                        then.get(name, env.get(name, FULL)), orelse.get(name, env.get(name, FULL))
                    )
        return env

    def expr(self, node: ast.Expr, env: dict) -> tuple[float, float]:
        # Iterative post-order: specs may nest up to parser.MAX_DEPTH, and we add no recursion.
        values: dict[int, tuple[float, float]] = {}
        stack = [(node, False)]
        while stack:
            item, ready = stack.pop()
            children = _children(item)
            if not ready and children:
                stack.append((item, True))
                stack.extend((child, False) for child in children)
                continue
            values[id(item)] = _clean(*self.apply(item, [values[id(c)] for c in children], env))
        return values[id(node)]

    def apply(self, node, args, env):
        point = self.constant(node, args)
        if point is not None:
            return (point, point)
        if isinstance(node, ast.Number):
            return (node.value, node.value)
        if isinstance(node, ast.Name):
            return env.get(node.id, FULL)
        if isinstance(node, ast.Unary):
            return (-args[0][1], -args[0][0]) if node.op == "-" else FULL
        if isinstance(node, ast.Binary):
            return self.binary(node, *args)
        if isinstance(node, ast.Call):
            return self.call(node, args)
        return FULL  # true / false

    def constant(self, node, args) -> float | None:
        """The value of an arithmetic op on constants, if finite; an infinite one is an error."""
        opcode = (
            BINARY_OPCODES.get(node.op)
            if isinstance(node, ast.Binary)
            else UNARY_OPCODES.get(node.op)
            if isinstance(node, ast.Unary)
            else node.func.id
            if isinstance(node, ast.Call)
            else None
        )
        op = OPS.get(opcode)
        if (
            op is None
            or op.numpy is None
            or op.result != "float"
            or "bool" in op.operands
            or not args
            or any(lo != hi or not math.isfinite(lo) for lo, hi in args)
        ):
            return None
        with np.errstate(all="ignore"):
            value = float(op.numpy(*(np.float64(lo) for lo, _ in args)))
        if math.isfinite(value) or math.isnan(value) or not self.report or opcode == "div":
            # nan: the warnings say why; x / 0 is E218 below
            return value if math.isfinite(value) else None
        if opcode == "pow" and args[0][0] == 0:
            raise SpecError(
                "division by zero: 0 to a negative power",
                self.spec.source,
                node.span,
                "check the exponent; 0^-1 is 1/0, which gives inf",
                code="E218",
            )
        raise SpecError(
            f"this constant is {value} in float64",
            self.spec.source,
            node.span,
            "use a value that is finite in float64 (at most about 1.8e308 in magnitude)",
            code="E223",
        )

    def binary(self, node: ast.Binary, a, b):
        if node.op == "+":
            return (a[0] + b[0], a[1] + b[1])
        if node.op == "-":
            return (a[0] - b[1], a[1] - b[0])
        if node.op == "*":
            if ast.format_expr(node.left) == ast.format_expr(node.right):  # x * x: a square
                # (x ** 2 raises OverflowError past 1e154; x * x is inf)
                squares = (
                    a[0] * a[0],
                    a[1] * a[1],
                )
                return (0.0 if a[0] <= 0 <= a[1] else min(squares), max(squares))
            return _mul(a, b)
        if node.op == "/":
            if b == (0.0, 0.0) and self.report:
                raise SpecError(
                    "division by zero: this divisor is always 0",
                    self.spec.source,
                    node.right.span,
                    "check the expression; a zero divisor gives inf or nan",
                    code="E218",
                )
            if b[0] > 0 or b[1] < 0:
                return _mul(a, (1 / b[1], 1 / b[0]))
            return NONNEG if a[0] >= 0 and b[0] >= 0 else FULL
        if node.op == "^":
            fractional = b[0] == b[1] and math.isfinite(b[0]) and not float(b[0]).is_integer()
            if a[0] < 0 and fractional and self.report:
                self.warn(
                    node.left,
                    f"a value that can be negative to the power {b[0]:g} (nan in float)",
                    code="W202",
                )
            if a[0] >= 0:
                return (0.0, 1.0 if a[1] <= 1 and b[0] >= 0 else INF)
            even = b[0] == b[1] and float(b[0]).is_integer() and b[0] % 2 == 0
            return NONNEG if even else FULL
        return FULL  # comparisons and logic: conditions, never arithmetic operands

    def call(self, node: ast.Call, args):
        fn = FUNCTIONS[node.func.id]
        if fn.domain_nonneg and args[0][0] < 0 and self.report:
            self.warn(
                node.args[0],
                f"{fn.name} of a value that can be negative (nan in float)",
                code="W201",
            )
        return fn.interval(*args)

    def warn(self, node, message: str, *, code: str) -> None:
        self.warnings[(node.span.line, node.span.col)] = SpecError(
            message,
            self.spec.source,
            node.span,
            "declare the ranges that keep it >= 0 (e.g. hyper b2 = 0.999 in [0, 1)), or take "
            "abs() or max(x, 0) first",
            code=code,
        )


def _children(node) -> tuple:
    if isinstance(node, ast.Unary):
        return (node.operand,)
    if isinstance(node, ast.Binary):
        return (node.left, node.right)
    if isinstance(node, ast.Call):
        return node.args
    return ()
