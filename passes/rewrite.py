"""The one loop every rewriting pass uses: walk ops in order, let a rule replace each."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from optgen.ir import Builder, Function, Op, Value

# A rule sees an op (operands already replaced) and may return a value to use instead
# of its result, emitting any new ops through the builder. None keeps the op.
Rule = Callable[[Op, Builder, dict[int, Op]], Value | None]


def rewrite(func: Function, rule: Rule) -> Function:
    """Apply ``rule`` to every op in order; ``defs`` maps a value's id to the op that defines it."""
    builder, replaced, defs = Builder(), {}, {}
    for op in func.ops:
        operands = tuple(replaced.get(id(v), v) for v in op.operands)
        if operands != op.operands:
            op = replace(op, operands=operands)
        start = len(builder.ops)
        new = rule(op, builder, defs)
        if new is None:
            builder.ops.append(op)
        else:
            replaced[id(op.result)] = new
        for added in builder.ops[start:]:
            defs[id(added.result)] = added
    outputs = tuple((name, replaced.get(id(v), v)) for name, v in func.outputs)
    return func.with_body(builder.ops, outputs)


def const_value(value: Value, defs: dict[int, Op]):
    """The constant ``value`` holds, or None if it is not a constant."""
    op = defs.get(id(value))
    return op.attr if op is not None and op.opcode == "const" else None
