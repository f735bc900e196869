"""stochastic_rounding: float32 values stored in bfloat16 round stochastically, not to nearest.

As torchao's ``bf16_stochastic_round=True``: a bf16 parameter or state takes each new value
rounded up or down to a neighbouring bf16 value with the probabilities that make the
rounding unbiased (``codegen/rounding.py``), so updates below half a bf16 ulp still move
the parameter in expectation. The random bits are a hash of the step number ``t``, the
parameter and the element: no state, reproducible, and alike on every lowering. Stores in
other dtypes (f32, f16) still round to nearest.
"""

from __future__ import annotations

from dataclasses import replace

from optgen.ir import Program
from optgen.transforms.edit import Editor
from optgen.transforms.option import boolean

NAME = "stochastic_rounding"
OPTIONS = (boolean(NAME),)


def enabled(options) -> bool:
    return options[NAME]


def apply(program: Program, options) -> Program:
    ed = Editor(program.update, NAME)
    if not ed.has_input("t"):  # the step number seeds the hash
        ed.add_input("t", "step")
    update = ed.finish(ed.body())
    return replace(program, update=update, rounding="stochastic")
