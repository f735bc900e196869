"""dce: dead code elimination.

Ops whose results no output needs are removed.
"""

from __future__ import annotations

from optgen.ir import Function


def run(func: Function) -> Function:
    live = {id(v) for _, v in func.outputs}
    kept = []
    for op in reversed(func.ops):
        if id(op.result) in live:
            kept.append(op)
            live.update(id(v) for v in op.operands)
    return func.with_body(reversed(kept))
