"""cse: common subexpression elimination.

Two ops with the same opcode, operands and constant compute the same value; the
later one is replaced by the earlier. Operands of commutative ops are compared as a
set, so ``a*b`` and ``b*a`` are one value.
"""

from __future__ import annotations

from optgen.passes.rewrite import rewrite

from optgen.ir import Function

COMMUTATIVE = {"add", "mul", "max", "min", "eq", "ne", "and", "or"}


def run(func: Function) -> Function:
    seen = {}

    def rule(op, builder, defs):
        ids = [id(v) for v in op.operands]
        # repr keeps 0.0 and -0.0 (and 1.0 and True) apart.
        key = (
            op.opcode,
            tuple(sorted(ids)) if op.opcode in COMMUTATIVE else tuple(ids),
            repr(op.attr),
        )
        if key in seen:
            return seen[key]
        seen[key] = op.result
        return None

    return rewrite(func, rule)
