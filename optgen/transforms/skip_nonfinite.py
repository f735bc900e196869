"""skip_nonfinite: a step whose gradients hold a NaN or an infinity changes nothing, and is counted.

As ``optax.apply_if_finite``: when any element of any gradient is not finite,
parameters and every state keep their values bit for bit, and the per-step state
``total_notfinite`` grows by one. The wrapped update sees as its step number the
count of finite steps, ``t - total_notfinite``.
"""

from __future__ import annotations

from optgen.ir import Program
from optgen.transforms.edit import Editor, gate, replace_update
from optgen.transforms.option import boolean

NAME = "skip_nonfinite"
COUNT = "total_notfinite"
OPTIONS = (boolean(NAME),)


def enabled(options) -> bool:
    return options[NAME]


def apply(program: Program, options) -> Program:
    ed = Editor(program.update, NAME)
    skipped = ed.add_input(COUNT, "step")
    zero, one = ed.const(0.0), ed.const(1.0)
    bad = ed.op("select", ed.op("isfinite", ed.input("g")), zero, one)
    finite = ed.op("eq", ed.op("gsum", ed.op("sum", bad)), zero)
    outputs = ed.body({"t": ed.op("sub", ed.input("t"), skipped)})
    outputs = gate(ed, finite, outputs, {name: ed.input(name) for name in outputs})
    outputs[COUNT] = ed.op("add", skipped, ed.op("select", finite, zero, one))
    return replace_update(program, ed.finish(outputs), NAME, {COUNT: lambda init: init.const(0.0)})
