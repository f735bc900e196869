"""gradient_accumulation_steps: update every k calls, with the mean of the k gradients.

As Keras 3 and ``optax.MultiSteps``: call ``t`` (1-based) adds ``g`` to an accumulator;
when ``t`` is a multiple of ``k`` the wrapped update runs with ``(acc + g) / k`` and
the accumulator resets to 0, otherwise parameters and state keep their values.
The wrapped update sees as its step number the number of updates so far, plus one:
``t' = floor((t - 1) / k) + 1``. ``k`` is a hyperparameter of the same name.
"""

from __future__ import annotations

from optgen.ir import Program, Value
from optgen.transforms.edit import Editor, gate, replace_update
from optgen.transforms.option import integer_at_least

NAME = "gradient_accumulation_steps"
ACCUMULATOR = "grad_accumulator"
OPTIONS = (integer_at_least(NAME, 2),)


def updates_before(ed: Editor) -> Value:
    """The number of updates applied before this call: ``t - 1``, or ``floor((t - 1) / k)`` when
    an accumulation transform is inside ``ed``'s function (Keras's ``optimizer.iterations``)."""
    calls = ed.op("sub", ed.input("t"), ed.const(1.0))
    if not ed.has_input(NAME):
        return calls
    k = ed.input(NAME)
    return ed.op("div", ed.op("sub", calls, ed.op("mod", calls, k)), k)


def enabled(options) -> bool:
    return options[NAME] is not None


def apply(program: Program, options) -> Program:
    ed = Editor(program.update, NAME)
    k, g = ed.add_input(NAME, "step"), ed.input("g")
    acc = ed.add_input(ACCUMULATOR, "tensor")
    is_update = ed.op("eq", ed.op("mod", ed.input("t"), k), ed.const(0.0))
    total = ed.op("add", acc, g)
    step = ed.op("add", updates_before(ed), ed.const(1.0))
    outputs = ed.body({"g": ed.op("div", total, k), "t": step})
    outputs = gate(ed, is_update, outputs, {name: ed.input(name) for name in outputs})
    outputs[ACCUMULATOR] = ed.op("select", is_update, ed.const(0.0), total)
    return replace_update(
        program, ed.finish(outputs), NAME, {ACCUMULATOR: lambda init: init.const(0.0)}
    )
