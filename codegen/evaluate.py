"""Run an IR function over every parameter at once, on a pluggable backend.

One evaluator serves both the NumPy reference interpreter and the StableHLO emitter,
so both give ops the same meaning. Each IR value becomes, by its extent:

- ``step``: one scalar, computed once in the step dtype (float32, or float64 when
  JAX's x64 mode is on) and shared by every parameter;
- ``leaf``: one scalar per parameter, in that parameter's compute dtype;
- ``tensor``: one array per parameter, in that parameter's compute dtype.

A parameter's compute dtype is its storage dtype widened to at least float32: low
precision values are loaded, computed in float32, and rounded once on store.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol, Sequence

import numpy as np

from optgen.ir import Function, Loc, Value

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def compute_dtype(storage: np.dtype) -> np.dtype:
    """The dtype a parameter of ``storage`` dtype is computed in: at least float32."""
    storage = np.dtype(storage)
    return storage if storage in _FLOATS else np.dtype(np.float32)


class Backend(Protocol):
    """The few primitives the evaluator needs; X is the backend's array type."""

    def at(self, loc: Loc | None) -> AbstractContextManager: ...
    def dtype_of(self, x) -> np.dtype: ...
    def constant(self, value: float | bool, dtype: np.dtype): ...
    def apply(self, opcode: str, operands: list): ...
    def convert(self, x, dtype: np.dtype): ...
    def broadcast(self, x, like): ...
    def reduce_sum(self, x): ...
    def size(self, x, dtype: np.dtype): ...


def evaluate(func: Function, backend: Backend, tensors: dict[str, Sequence], scalars: dict,
             step_dtype: np.dtype, out_dtypes: dict[str, Sequence[np.dtype]],
             delta_output: str | None = None) -> dict[str, list]:
    """Evaluate ``func`` for every parameter; return each output as a list of per-parameter arrays.

    ``tensors`` maps each tensor input to one array per parameter (``p`` first: its
    dtypes set the compute dtypes), ``scalars`` each step input to one scalar.
    ``out_dtypes`` gives each output's storage dtype per parameter. If
    ``delta_output`` names an output, that output is returned as its change
    (new - old, computed before rounding) rather than its new value.
    """
    params = tensors["p"]
    params_value = func.input("p")
    dtypes = [compute_dtype(backend.dtype_of(x)) for x in params]
    leaves = range(len(params))
    env: dict[int, object] = {}
    for value in func.inputs:
        if value.type.extent == "step":
            env[id(value)] = backend.convert(scalars[value.name], step_dtype)
        else:
            env[id(value)] = [backend.convert(x, dt) for x, dt in zip(tensors[value.name], dtypes, strict=True)]

    converted: dict[tuple[int, int], object] = {}

    def on_leaf(value: Value, i: int, extent: str):
        """``value`` as parameter i sees it, widened to ``extent``."""
        x = env[id(value)]
        if value.type.extent == "step":
            key = (id(value), i)
            if key not in converted:
                converted[key] = x if value.type.kind == "bool" else backend.convert(x, dtypes[i])
            x = converted[key]
        else:
            x = x[i]
        if extent == "tensor" and value.type.extent != "tensor":
            x = backend.broadcast(x, env[id(params_value)][i])
        return x

    for op in func.ops:
        extent = op.result.type.extent
        with backend.at(op.loc):
            if op.opcode == "const":
                env[id(op.result)] = backend.constant(op.attr, step_dtype)
            elif op.opcode == "gsum":
                parts = [backend.convert(x, step_dtype) for x in env[id(op.operands[0])]]
                total = parts[0]
                for part in parts[1:]:
                    total = backend.apply("add", [total, part])
                env[id(op.result)] = total
            elif op.opcode in ("sum", "size"):
                source = env[id(op.operands[0])]
                env[id(op.result)] = [backend.reduce_sum(x) if op.opcode == "sum"
                                      else backend.size(x, dtypes[i]) for i, x in enumerate(source)]
            elif extent == "step":
                env[id(op.result)] = backend.apply(op.opcode, [env[id(v)] for v in op.operands])
            else:
                env[id(op.result)] = [backend.apply(op.opcode, [on_leaf(v, i, extent) for v in op.operands])
                                      for i in leaves]

    outputs = {}
    for name, value in func.outputs:
        per_leaf = [on_leaf(value, i, "tensor") for i in leaves]
        if name == delta_output:
            old = env[id(func.input(name))]
            per_leaf = [backend.apply("sub", [new, old[i]]) for i, new in enumerate(per_leaf)]
        outputs[name] = [backend.convert(x, dt) for x, dt in zip(per_leaf, out_dtypes[name], strict=True)]
    return outputs
