"""Rewriting an IR function for a transform: new inputs, ops before and after the body.

A transform reads the function it wraps as a black box with named inputs and outputs:
it may add inputs, compute values before the body (a clipped ``g``), substitute them
for inputs throughout the body, and compute new outputs from the body's outputs (a
gated ``p``). Body ops whose operands change are rebuilt, so their types follow the
substitution (``weight_decay`` becoming one value per parameter widens what uses it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from optgen.diagnostics import SpecError
from optgen.ir import Builder, Function, Loc, Program, Value
from optgen.types import Type


class Editor:
    """Rebuilds ``func``: ops emitted before :meth:`body` run first, ops after it last.

    Every op a transform emits carries ``loc("<NAME>":1:1)``, so IR text, StableHLO and
    XLA dumps say which transform made it.
    """

    def __init__(self, func: Function, transform: str):
        self.func = func
        self.inputs = list(func.inputs)
        self.loc = Loc(f"<{transform}>", 1, 1)
        self.transform = transform
        self.builder = Builder()

    def input(self, name: str) -> Value:
        return next(v for v in self.inputs if v.name == name)

    def has_input(self, name: str) -> bool:
        return any(v.name == name for v in self.inputs)

    def add_input(self, name: str, extent: str) -> Value:
        """A new input; its name must be free (a spec's own ``state ema_average`` would clash)."""
        if self.has_input(name):
            raise SpecError(
                f"{self.transform} adds '{name}', but the spec already has a '{name}'",
                hint=f"rename the spec's '{name}', or leave {self.transform} off",
                code="E345",
            )
        value = Value(Type(extent), name)
        self.inputs.append(value)
        return value

    def op(self, opcode: str, *operands: Value) -> Value:
        return self.builder.op(opcode, *operands, loc=self.loc)

    def const(self, value: float | bool) -> Value:
        return self.builder.const(value, self.loc)

    def body(self, substitute: dict[str, Value] | None = None) -> dict[str, Value]:
        """Emit the wrapped function's ops, with the inputs named in ``substitute`` replaced;
        return its outputs by name. Call it once, between the ops that run before and after."""
        mapping = {id(self.input(name)): value for name, value in (substitute or {}).items()}
        for op in self.func.ops:
            operands = tuple(mapping.get(id(v), v) for v in op.operands)
            if operands == op.operands:
                self.builder.ops.append(op)
            else:
                mapping[id(op.result)] = self.builder.op(
                    op.opcode, *operands, attr=op.attr, loc=op.loc
                )
        return {name: mapping.get(id(v), v) for name, v in self.func.outputs}

    def finish(self, outputs: dict[str, Value]) -> Function:
        return Function(
            self.func.name, tuple(self.inputs), tuple(self.builder.ops), tuple(outputs.items())
        )


def replace_update(
    program: Program,
    update: Function,
    transform: str,
    initial: dict[str, Callable[[Editor], Value]] | None = None,
) -> Program:
    """``program`` with a new update function, and the init function extended by the states it adds.

    ``initial`` maps each new state to a function building its initial value in the init
    function (whose inputs are ``p`` and the hyperparameters). A state whose update input
    is a ``step`` scalar is a per-step state (a counter), stored as one scalar.
    """
    initial = initial or {}
    init = Editor(program.init, transform)
    outputs = init.body()
    for name, make in initial.items():
        outputs[name] = make(init)
    return replace(
        program,
        update=update,
        init=init.finish(outputs),
        state_dtypes=program.state_dtypes | {name: None for name in initial},
        state_extents=program.state_extents
        | {name: update.input(name).type.extent for name in initial},
    )


def gate(
    editor: Editor, cond: Value, new: dict[str, Value], old: dict[str, Value]
) -> dict[str, Value]:
    """Each output ``new`` where ``cond`` holds, else its value before the step (bit for bit)."""
    return {
        name: editor.op("select", cond, value, old[name]) if name in old else value
        for name, value in new.items()
    }
