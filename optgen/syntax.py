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
    operand: "Expr"
    span: Span


@dataclass(frozen=True)
class Binary:
    op: str  # + - * / ^ < <= > >= == != and or
    left: "Expr"
    right: "Expr"
    span: Span


@dataclass(frozen=True)
class Call:
    func: Name
    args: tuple["Expr", ...]
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
    then: tuple["Stmt", ...]
    orelse: tuple["Stmt", ...]
    span: Span


Stmt = Assign | If


@dataclass(frozen=True)
class Hyper:
    """``hyper name = default``: a runtime scalar; changing it never recompiles."""

    name: Name
    default: float
    span: Span


@dataclass(frozen=True)
class Option:
    """``option name = true|false``: a compile-time flag that selects ``if`` branches."""

    name: Name
    default: bool
    span: Span


@dataclass(frozen=True)
class State:
    """``state name[: dtype] = init``: one array per parameter, same shape."""

    name: Name
    dtype: Name | None
    init: Expr
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


def walk(expr: Expr):
    """Yield ``expr`` and every sub-expression, parents first (iteratively: specs may nest deeply)."""
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
