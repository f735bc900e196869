"""clipnorm, global_clipnorm, clipvalue: clip the gradient before the update (Keras's names).

Each adds a hyperparameter of its own name ``c`` and replaces ``g`` in the update by:

- ``clipnorm``: per tensor, ``g * c / max(||g||, c)`` (Keras's ``_clip_by_norm``);
- ``global_clipnorm``: ``g`` if ``||G|| < c`` else ``g / ||G|| * c``, where ``||G||`` is the
  norm over every parameter's gradient (``optax.clip_by_global_norm``);
- ``clipvalue``: ``clip(g, -c, c)``, elementwise (``optax.clip``).
"""

from __future__ import annotations

from optgen.ir import Program, Value
from optgen.lower import builtin_call
from optgen.transforms.edit import Editor, replace_update


def _clipnorm(ed: Editor, g: Value, c: Value) -> Value:
    norm = builtin_call(ed.builder, "norm", [g], ed.loc)
    return ed.op("div", ed.op("mul", g, c), ed.op("max", norm, c))


def _global_clipnorm(ed: Editor, g: Value, c: Value) -> Value:
    norm = builtin_call(ed.builder, "global_norm", [g], ed.loc)
    return ed.op("select", ed.op("lt", norm, c), g, ed.op("mul", ed.op("div", g, norm), c))


def _clipvalue(ed: Editor, g: Value, c: Value) -> Value:
    return builtin_call(ed.builder, "clip", [g, ed.op("neg", c), c], ed.loc)


RULES = {"clipnorm": _clipnorm, "global_clipnorm": _global_clipnorm, "clipvalue": _clipvalue}


def apply(program: Program, name: str) -> Program:
    """``program`` with its gradient clipped by the rule ``name`` (a key of :data:`RULES`)."""
    ed = Editor(program.update, name)
    g = RULES[name](ed, ed.input("g"), ed.add_input(name, "step"))
    return replace_update(program, ed.finish(ed.body({"g": g})), name)
