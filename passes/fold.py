"""fold: evaluate ops whose operands are all constants.

Folding happens in float64 with the reference interpreter's meaning of each op, so a
folded constant is at least as accurate as computing it at run time.
"""

from __future__ import annotations

import numpy as np

from optgen.codegen.interpret import NUMPY_OPS
from optgen.ir import Function
from optgen.passes.rewrite import const_value, rewrite


def run(func: Function) -> Function:
    def rule(op, builder, defs):
        if op.opcode not in NUMPY_OPS or not op.operands:
            return None
        values = [const_value(v, defs) for v in op.operands]
        if any(v is None for v in values):
            return None
        args = [np.asarray(v, dtype=bool if isinstance(v, bool) else np.float64) for v in values]
        with np.errstate(all="ignore"):
            result = NUMPY_OPS[op.opcode](*args)
        value = bool(result) if op.result.type.kind == "bool" else float(result)
        return builder.const(value, op.loc)

    return rewrite(func, rule)
