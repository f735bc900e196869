"""fold: evaluate ops whose operands are all constants.

Folding happens in float64 with each op's NumPy meaning from the op table (the
reference interpreter's), so a folded constant is at least as accurate as computing it
at run time.
"""

from __future__ import annotations

import numpy as np
from optgen.passes.rewrite import const_value, rewrite

from optgen.ir import Function
from optgen.ops import OPS


def run(func: Function) -> Function:
    def rule(op, builder, defs):
        if not op.operands or OPS[op.opcode].numpy is None:  # const, or a structural op
            return None
        values = [const_value(v, defs) for v in op.operands]
        if any(v is None for v in values):
            return None
        args = [np.asarray(v, dtype=bool if isinstance(v, bool) else np.float64) for v in values]
        with np.errstate(all="ignore"):
            result = OPS[op.opcode].numpy(*args)
        value = bool(result) if op.result.type.kind == "bool" else float(result)
        return builder.const(value, op.loc)

    return rewrite(func, rule)
