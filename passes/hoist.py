"""hoist: move per-step work out of per-element code.

Three rewrites, in one forward walk:

1. A per-element value divided by a per-step one becomes a multiplication by the
   per-step reciprocal: ``mu / (1 - b1^t)`` costs one multiply per element and one
   divide per step.
2. A per-step factor times a product that already has a per-step factor gathers both
   into one per-step product: ``lr * (s * x) -> (lr * s) * x`` (only when the inner
   product has no other use, so no per-element work is added).
3. Ops whose value is one number per step, and that do not depend on any parameter,
   move to the top of the function, so they are computed once per step and read as
   a prologue.

1 and 2 reassociate floating-point arithmetic: results change by a few ulps.
"""

from __future__ import annotations

from collections import Counter

from optgen.passes.rewrite import rewrite

from optgen.ir import Function


def _is_step(value) -> bool:
    return value.type.extent == "step" and value.type.kind == "float"


def run(func: Function) -> Function:
    uses = Counter(id(v) for op in func.ops for v in op.operands)
    uses.update(id(v) for _, v in func.outputs)

    def rule(op, builder, defs):
        new = reassociate(op, builder, defs)
        if new is not None:  # the replacement inherits the uses of what it replaces
            uses[id(new)] = uses[id(op.result)]
        return new

    def reassociate(op, builder, defs):
        if op.result.type.extent == "step":
            return None
        a, b = (op.operands + (None, None))[:2]
        if op.opcode == "div" and _is_step(b):
            one = builder.const(1.0, op.loc)
            return builder.op("mul", a, builder.op("div", one, b, loc=op.loc), loc=op.loc)
        if op.opcode == "mul":
            outer, inner = (a, b) if _is_step(a) else (b, a)
            inner_op = defs.get(id(inner))
            if (
                _is_step(outer)
                and inner_op is not None
                and inner_op.opcode == "mul"
                and uses[id(inner_op.result)] <= 1
            ):
                x, y = inner_op.operands
                step, rest = (x, y) if _is_step(x) else (y, x)
                if _is_step(step) and not _is_step(rest):
                    return builder.op(
                        "mul", builder.op("mul", outer, step, loc=op.loc), rest, loc=op.loc
                    )
        return None

    func = rewrite(func, rule)
    return func.with_body(_schedule_step_ops_first(func))


def _schedule_step_ops_first(func: Function):
    hoistable = {id(v) for v in func.inputs if v.type.extent == "step"}
    first, rest = [], []
    for op in func.ops:
        if op.result.type.extent == "step" and all(id(v) in hoistable for v in op.operands):
            hoistable.add(id(op.result))
            first.append(op)
        else:
            rest.append(op)
    return first + rest
