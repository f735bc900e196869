"""canon: algebraic canonicalization.

Rewrites that give the same value in IEEE arithmetic, up to the sign of a zero (or
exactly what jnp computes for the same expression): ``x^2 -> x*x`` (as ``jnp`` squares),
``x^1 -> x``, ``x^0.5 -> sqrt(x)``, ``x^-0.5 -> rsqrt(x)``, ``x*1 -> x``, ``x/1 -> x``,
``x+0 -> x``, ``x-0 -> x``, ``0-x -> -x``, ``-(-x) -> x``, ``x+(-y) -> x-y``, ``x-(-y) -> x+y``.
``x*0 -> 0`` is not done: it is wrong for inf and nan.
"""

from __future__ import annotations

from optgen.passes.rewrite import const_value, rewrite

from optgen.ir import Function


def run(func: Function) -> Function:
    def rule(op, builder, defs):
        args = op.operands
        consts = [const_value(v, defs) for v in args]
        defining = [defs.get(id(v)) for v in args]

        def same_type(value):
            return value if value.type == op.result.type else None

        if op.opcode == "pow" and consts[1] is not None:
            exponent, base = consts[1], args[0]
            if exponent == 2:
                return builder.op("mul", base, base, loc=op.loc)
            if exponent == 1:
                return same_type(base)
            if exponent in (0.5, -0.5):
                return builder.op("sqrt" if exponent > 0 else "rsqrt", base, loc=op.loc)
        if op.opcode == "mul":
            if consts[1] == 1:
                return same_type(args[0])
            if consts[0] == 1:
                return same_type(args[1])
        if op.opcode == "div" and consts[1] == 1:
            return same_type(args[0])
        if op.opcode in ("add", "sub") and consts[1] == 0:
            return same_type(args[0])
        if op.opcode == "add" and consts[0] == 0:
            return same_type(args[1])
        if op.opcode == "sub" and consts[0] == 0:
            return builder.op("neg", args[1], loc=op.loc)
        if op.opcode == "neg" and defining[0] is not None and defining[0].opcode == "neg":
            return same_type(defining[0].operands[0])
        if op.opcode in ("add", "sub") and defining[1] is not None and defining[1].opcode == "neg":
            flipped = "sub" if op.opcode == "add" else "add"
            return builder.op(flipped, args[0], defining[1].operands[0], loc=op.loc)
        return None

    return rewrite(func, rule)
