"""kahan_sum: bf16 and f16 parameters keep, in a state, the low bits each store of ``p`` drops.

As torch-optimi's ``kahan_sum=True``: a parameter stored in bfloat16 loses every update
smaller than half its ulp (a bf16 parameter of 1.0 never moves under steps of 1e-3). A
state ``kahan_comp`` in the parameter's dtype holds what the last store rounded away, and
the next step adds it back. With ``p'`` the float32 value the wrapped update (the spec's,
after clips and the weight-decay mask) gives for ``p`` and ``c`` the compensation::

    s  = p' + c            # the step's exact target, to float32
    p  = stored(s)         # s rounded to the parameter's dtype (to nearest)
    c  = s - p             # what the store dropped (exact), stored in the parameter's dtype

A float32 or float64 parameter stores ``s`` exactly, so its ``c`` stays 0 and its ``p`` is
the wrapped update's (as torch-optimi, which compensates only low-precision parameters).
The pair ``p + c`` carries about twice the parameter's significant bits. Accumulation, EMA
and skip_nonfinite wrap this transform: a call that does not update leaves ``p`` and ``c`` bit
for bit, and an EMA overwrite stores the average to nearest.
"""

from __future__ import annotations

from optgen.diagnostics import SpecError
from optgen.ir import Program
from optgen.transforms.edit import Editor, replace_update
from optgen.transforms.option import boolean

NAME = "kahan_sum"
COMPENSATION = "kahan_comp"
OPTIONS = (boolean(NAME),)


def check(settings: dict) -> None:
    if settings.get(NAME) and settings.get("stochastic_rounding"):
        raise SpecError(
            "kahan_sum and stochastic_rounding both decide how a bf16 parameter's update is kept",
            hint="choose one: kahan_sum keeps the dropped bits in a state, stochastic_rounding "
            "keeps them in expectation without one",
            code="E421",
        )


def enabled(options) -> bool:
    return options[NAME]


def apply(program: Program, options) -> Program:
    ed = Editor(program.update, NAME)
    compensation = ed.add_input(COMPENSATION, "tensor")
    outputs = ed.body()
    target = ed.op("add", outputs["p"], compensation)
    outputs["p"] = ed.op("stored", target)
    outputs[COMPENSATION] = ed.op("sub", target, outputs["p"])
    return replace_update(
        program, ed.finish(outputs), NAME, {COMPENSATION: lambda init: init.const(0.0)}
    )
