"""clipnorm, global_clipnorm, clipvalue: clip the gradient before the update (Keras's names).

Each adds a hyperparameter of its own name ``c`` and replaces ``g`` in the update by:

- ``clipnorm``: per tensor, ``g * c / max(||g||, c)`` (Keras's ``_clip_by_norm``);
- ``global_clipnorm``: ``g`` if ``||G|| < c`` else ``g / ||G|| * c``, where ``||G||`` is the
  norm over every parameter's gradient (``optax.clip_by_global_norm``);
- ``clipvalue``: ``clip(g, -c, c)``, elementwise (``optax.clip``).
"""

from __future__ import annotations

from optgen.diagnostics import SpecError
from optgen.ir import Program, Value
from optgen.lower import builtin_call
from optgen.transforms.edit import Editor, replace_update
from optgen.transforms.option import positive


def _clipnorm(ed: Editor, g: Value, c: Value) -> Value:
    norm = builtin_call(ed.builder, "norm", [g], ed.loc)
    return ed.op("div", ed.op("mul", g, c), ed.op("max", norm, c))


def _global_clipnorm(ed: Editor, g: Value, c: Value) -> Value:
    norm = builtin_call(ed.builder, "global_norm", [g], ed.loc)
    return ed.op("select", ed.op("lt", norm, c), g, ed.op("mul", ed.op("div", g, norm), c))


def _clipvalue(ed: Editor, g: Value, c: Value) -> Value:
    return builtin_call(ed.builder, "clip", [g, ed.op("neg", c), c], ed.loc)


RULES = {"clipnorm": _clipnorm, "global_clipnorm": _global_clipnorm, "clipvalue": _clipvalue}
OPTIONS = tuple(positive(name) for name in RULES)


def check(settings: dict) -> None:
    clips = [name for name in RULES if name in settings]
    if len(clips) > 1:
        raise SpecError(
            "only one of clipnorm, clipvalue and global_clipnorm can be set, got "
            f"{', '.join(clips)}",
            hint="as in Keras; chain optax.clip_by_global_norm in front for a second clip",
            code="E340",
        )


def enabled(options) -> bool:
    return any(options[name] is not None for name in RULES)


def apply(program: Program, options) -> Program:
    """``program`` with its gradient clipped by the rule the options sets (one of :data:`RULES`)."""
    name = next(name for name in RULES if options[name] is not None)
    ed = Editor(program.update, name)
    g = RULES[name](ed, ed.input("g"), ed.add_input(name, "step"))
    return replace_update(program, ed.finish(ed.body({"g": g})), name)
