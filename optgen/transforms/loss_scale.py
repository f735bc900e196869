"""loss_scale_factor: gradients arrive multiplied by the loss scale ``s``; the update sees ``g /
s``.

As Keras's ``loss_scale_factor`` (the loss was multiplied by ``s`` before
differentiation, e.g. for float16 training). It runs before every other transform.
"""

from __future__ import annotations

from optgen.ir import Program
from optgen.transforms.edit import Editor, replace_update
from optgen.transforms.option import positive

NAME = "loss_scale_factor"
OPTIONS = (positive(NAME),)


def enabled(options) -> bool:
    return options[NAME] is not None


def apply(program: Program, options) -> Program:
    ed = Editor(program.update, NAME)
    g = ed.op("div", ed.input("g"), ed.add_input(NAME, "step"))
    return replace_update(program, ed.finish(ed.body({"g": g})), NAME)
