"""use_ema: keep an exponential moving average of the parameters (Keras's ``use_ema``).

After the wrapped update gives ``p``, with ``m = ema_momentum`` and ``i`` the number of
updates before this call (Keras's ``optimizer.iterations``)::

    m'  = 0 if i == 0 else m          # the first average is the parameter itself
    ema = m' * ema + (1 - m') * p

With ``ema_overwrite_frequency`` ``f``, ``p`` is replaced by the average whenever
``(i + 1) % f == 0``. ``Optimizer.finalize(params, state)`` returns the averages (the state ``ema``)
(Keras's ``finalize_variable_values``). ``ema_momentum`` and ``ema_overwrite_frequency``
are hyperparameters; the average is the state ``ema``, initialized to ``p``.
"""

from __future__ import annotations

from optgen.diagnostics import SpecError
from optgen.ir import Program
from optgen.transforms.accumulate import updates_before
from optgen.transforms.edit import Editor, replace_update
from optgen.transforms.option import boolean, fraction, integer_at_least

NAME = "use_ema"
AVERAGE = "ema"
OPTIONS = (
    boolean(NAME),
    fraction("ema_momentum", 0.99),
    integer_at_least("ema_overwrite_frequency", 1),
)


def check(settings: dict) -> None:
    if ("ema_momentum" in settings or "ema_overwrite_frequency" in settings) and not settings.get(
        NAME
    ):
        raise SpecError("ema_momentum and ema_overwrite_frequency need use_ema=True", code="E341")


def enabled(options) -> bool:
    return options[NAME]


def apply(program: Program, options) -> Program:
    ed = Editor(program.update, NAME)
    momentum, average = ed.add_input("ema_momentum", "step"), ed.add_input(AVERAGE, "tensor")
    overwrite = options["ema_overwrite_frequency"] is not None
    frequency = ed.add_input("ema_overwrite_frequency", "step") if overwrite else None
    before = updates_before(ed)
    outputs = ed.body()
    zero, one = ed.const(0.0), ed.const(1.0)
    m = ed.op("select", ed.op("ne", before, zero), momentum, zero)
    p = outputs["p"]
    new_average = ed.op("add", ed.op("mul", m, average), ed.op("mul", ed.op("sub", one, m), p))
    if frequency is not None:
        due = ed.op("eq", ed.op("mod", ed.op("add", before, one), frequency), zero)
        outputs["p"] = ed.op("select", due, new_average, p)
    outputs[AVERAGE] = new_average
    return replace_update(
        program, ed.finish(outputs), NAME, {AVERAGE: lambda init: init.input("p")}
    )
