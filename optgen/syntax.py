"""The abstract syntax tree of a spec: what the parser builds and the checker reads.

Every node carries the :class:`~optgen.diagnostics.Span` it came from, so any later
stage can point back at the spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from optgen.diagnostics import Source, Span


@dataclass(frozen=True)
class Number:
    value: float
    span: Span


@dataclass(frozen=True)
class Bool:
    value: bool
    span: Span


@dataclass(frozen=True)
class Name:
    id: str
    span: Span


@dataclass(frozen=True)
class Unary:
    op: str  # '-' or 'not'
    operand: Expr
    span: Span


@dataclass(frozen=True)
class Binary:
    op: str  # + - * / @ ^ < <= > >= == != and or
    left: Expr
    right: Expr
    span: Span


@dataclass(frozen=True)
class Call:
    func: Name
    args: tuple[Expr, ...]
    span: Span


Expr = Number | Bool | Name | Unary | Binary | Call


@dataclass(frozen=True)
class Assign:
    target: Name
    value: Expr
    span: Span


@dataclass(frozen=True)
class If:
    cond: Expr
    then: tuple[Stmt, ...]
    orelse: tuple[Stmt, ...]
    span: Span


@dataclass(frozen=True)
class Repeat:
    """``repeat N:``: the body, N times in a row; N is a count or a numeric option (fixed at compile
    time).
    """

    count: Number | Name
    body: tuple[Stmt, ...]
    span: Span


Stmt = Assign | If | Repeat


@dataclass(frozen=True)
class Range:
    """``in [lo, hi)``: the values a hyperparameter may take; ``(`` and ``)`` exclude the bound."""

    lo: float
    hi: float
    lo_open: bool
    hi_open: bool
    span: Span

    def contains(self, x: float) -> bool:
        return (self.lo < x if self.lo_open else self.lo <= x) and (
            x < self.hi if self.hi_open else x <= self.hi
        )

    def __str__(self) -> str:
        return (
            f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        )


@dataclass(frozen=True)
class Hyper:
    """``hyper name = default [in RANGE]``: a runtime scalar; changing it never recompiles."""

    name: Name
    default: float
    span: Span
    range: Range | None = None


@dataclass(frozen=True)
class Option:
    """``option name = true|false``: a compile-time flag that selects ``if`` branches; or
    ``option name = NUMBER``: a compile-time number (the factoring rule's minimum size)."""

    name: Name
    default: bool | float
    span: Span


@dataclass(frozen=True)
class State:
    """``state name[: shape dtype] = init``: per element (default), per parameter (``leaf``) or per
    step.
    """

    name: Name
    qualifiers: tuple[Name, ...]  # a shape and a storage dtype, each optional, in any order
    init: Expr
    span: Span


@dataclass(frozen=True)
class Input:
    """``input name``: one more per-element value handed to ``update``/``step`` beside the gradients
    (Sophia's Hessian-diagonal estimate): ``opt.update(grads, state, params, name=tree)``."""

    name: Name
    span: Span


@dataclass(frozen=True)
class Output:
    """``output name = expr``: a per-element value derived from ``p``, the states and the
    hyperparameters (Schedule-Free's evaluation point), computed on request by
    ``Optimizer.outputs``.
    """

    name: Name
    value: Expr
    span: Span


@dataclass(frozen=True)
class Spec:
    name: Name
    description: str
    hypers: tuple[Hyper, ...]
    options: tuple[Option, ...]
    states: tuple[State, ...]
    body: tuple[Stmt, ...]
    update_span: Span | None
    source: Source = field(repr=False)
    outputs: tuple[Output, ...] = ()
    inputs: tuple[Input, ...] = ()


def walk(expr: Expr):
    """Yield ``expr`` and every sub-expression, parents first (iteratively: specs may
    nest deeply).
    """
    stack = [expr]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, Unary):
            stack.append(node.operand)
        elif isinstance(node, Binary):
            stack.extend((node.right, node.left))
        elif isinstance(node, Call):
            stack.extend(reversed(node.args))


def format_expr(expr: Expr) -> str:
    """An expression as a fully parenthesized S-expression: ``(+ (* b1 mu) g)``."""
    if isinstance(expr, Number):
        return repr(expr.value)
    if isinstance(expr, Bool):
        return "true" if expr.value else "false"
    if isinstance(expr, Name):
        return expr.id
    if isinstance(expr, Unary):
        return f"({expr.op} {format_expr(expr.operand)})"
    if isinstance(expr, Binary):
        return f"({expr.op} {format_expr(expr.left)} {format_expr(expr.right)})"
    return f"({expr.func.id} {' '.join(format_expr(a) for a in expr.args)})"


def format_spec(spec: Spec) -> str:
    """The AST as indented S-expressions, one declaration or statement a line (``--emit ast``)."""
    lines = [f"(optimizer {spec.name.id} {spec.description!r}"]
    lines += [
        f"  (hyper {h.name.id} {h.default!r}{f' {h.range}' if h.range else ''})"
        for h in spec.hypers
    ]
    lines += [
        f"  (option {o.name.id} "
        f"{str(o.default).lower() if isinstance(o.default, bool) else o.default!r})"
        for o in spec.options
    ]
    lines += [
        f"  (state {s.name.id}{''.join(':' + q.id for q in s.qualifiers)} {format_expr(s.init)})"
        for s in spec.states
    ]
    lines += [f"  (input {i.name.id})" for i in spec.inputs]
    lines += [f"  (output {o.name.id} {format_expr(o.value)})" for o in spec.outputs]

    def block(stmts, depth):
        pad = "  " * depth
        for stmt in stmts:
            if isinstance(stmt, Assign):
                lines.append(f"{pad}(= {stmt.target.id} {format_expr(stmt.value)})")
            elif isinstance(stmt, Repeat):
                lines.append(f"{pad}(repeat {format_expr(stmt.count)}")
                block(stmt.body, depth + 1)
                lines[-1] += ")"
            else:
                lines.append(f"{pad}(if {format_expr(stmt.cond)}")
                block(stmt.then, depth + 1)
                if stmt.orelse:
                    lines.append(f"{pad} else")
                    block(stmt.orelse, depth + 1)
                lines[-1] += ")"

    lines.append("  (update")
    block(spec.body, 2)
    lines[-1] += "))"
    return "\n".join(lines) + "\n"


# Binding strength of each operator, loosest first, as the grammar nests them (optgen/grammar.lark).
_PRECEDENCE = {
    "or": 1,
    "and": 2,
    "not": 3,
    "<": 4,
    "<=": 4,
    ">": 4,
    ">=": 4,
    "==": 4,
    "!=": 4,
    "+": 5,
    "-": 5,
    "*": 6,
    "/": 6,
    "@": 6,
    "neg": 7,
    "^": 8,
}
_ATOM = 9


def _number(value: float) -> str:
    text = repr(float(value))
    return text.removesuffix(".0") if text.endswith(".0") and "e" not in text else text


def _precedence(expr: Expr) -> int:
    if isinstance(expr, Binary):
        return _PRECEDENCE[expr.op]
    if isinstance(expr, Unary):
        return _PRECEDENCE["neg" if expr.op == "-" else "not"]
    return _ATOM


def source_expr(expr: Expr) -> str:
    """An expression as spec text, with only the parentheses the grammar needs: ``b1 * mu + (1 - b1)
    * g``.
    """

    def wrapped(operand: Expr, at_least: int) -> str:
        text = source_expr(operand)
        return text if _precedence(operand) >= at_least else f"({text})"

    if isinstance(expr, Number):
        return _number(expr.value)
    if isinstance(expr, Bool):
        return "true" if expr.value else "false"
    if isinstance(expr, Name):
        return expr.id
    if isinstance(expr, Unary):
        level = _precedence(expr)
        return (
            f"-{wrapped(expr.operand, level)}"
            if expr.op == "-"
            else f"not {wrapped(expr.operand, level)}"
        )
    if isinstance(expr, Call):
        return f"{expr.func.id}({', '.join(source_expr(a) for a in expr.args)})"
    level = _PRECEDENCE[expr.op]
    if expr.op == "^":  # right-associative; its base is an atom, its exponent a unary
        return f"{wrapped(expr.left, _ATOM)}^{wrapped(expr.right, _PRECEDENCE['neg'])}"
    if level == 4:  # comparisons do not chain
        return f"{wrapped(expr.left, 5)} {expr.op} {wrapped(expr.right, 5)}"
    return f"{wrapped(expr.left, level)} {expr.op} {wrapped(expr.right, level + 1)}"


def _bound(value: float) -> str:
    return "inf" if value == float("inf") else "-inf" if value == float("-inf") else _number(value)


def format_source(spec: Spec) -> str:
    """The AST as spec text that parses back to the same tree (comments and layout are not kept).

    What ``optgen mutate`` prints: a program built or edited as a tree becomes a spec file.
    """
    lines = [f'optimizer {spec.name.id} "{spec.description}"', ""]
    for h in spec.hypers:
        bounds = h.range and (
            f" in {'(' if h.range.lo_open else '['}{_bound(h.range.lo)}, "
            f"{_bound(h.range.hi)}{')' if h.range.hi_open else ']'}"
        )
        lines.append(f"hyper {h.name.id} = {_number(h.default)}{bounds or ''}")
    for o in spec.options:
        lines.append(
            f"option {o.name.id} = "
            f"{str(o.default).lower() if isinstance(o.default, bool) else _number(o.default)}"
        )
    for s in spec.states:
        qualifiers = f": {' '.join(q.id for q in s.qualifiers)}" if s.qualifiers else ""
        lines.append(f"state {s.name.id}{qualifiers} = {source_expr(s.init)}")
    lines += [f"input {i.name.id}" for i in spec.inputs]
    lines += [f"output {o.name.id} = {source_expr(o.value)}" for o in spec.outputs]

    def block(stmts, depth):
        pad = "  " * depth
        for stmt in stmts:
            if isinstance(stmt, Assign):
                lines.append(f"{pad}{stmt.target.id} = {source_expr(stmt.value)}")
            elif isinstance(stmt, Repeat):
                count = (
                    stmt.count.id if isinstance(stmt.count, Name) else str(int(stmt.count.value))
                )
                lines.append(f"{pad}repeat {count}:")
                block(stmt.body, depth + 1)
            else:
                lines.append(f"{pad}if {source_expr(stmt.cond)}:")
                block(stmt.then, depth + 1)
                if stmt.orelse:
                    lines.append(f"{pad}else:")
                    block(stmt.orelse, depth + 1)

    lines += ["", "update:"]
    block(spec.body, 1)
    return "\n".join(lines) + "\n"
