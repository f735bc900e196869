"""Run an IR function over every parameter at once, on a pluggable backend.

One evaluator serves both the NumPy reference interpreter and the StableHLO emitter,
so both give ops the same meaning. Each IR value becomes, by its extent:

- ``step``: one scalar, computed once in the step dtype (float32, or float64 when
  JAX's x64 mode is on) and shared by every parameter;
- ``leaf``: one scalar per parameter, in that parameter's compute dtype;
- ``row``, ``col``: one array per parameter, with the axes they reduce kept as size 1
  (which axes, per parameter, is :class:`~optgen.types.Factoring`'s choice);
- ``tensor``: one array per parameter, in that parameter's compute dtype.

A parameter's compute dtype is its storage dtype widened to at least float32: low
precision values are loaded, computed in float32, and rounded once on store.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol, Sequence

import numpy as np

from optgen.ir import Function, Loc, Op, Value, dependencies
from optgen.types import NOT_FACTORED, Factoring

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
    def broadcast_to(self, x, shape: tuple[int, ...]): ...
    def reshape(self, x, shape: tuple[int, ...]): ...
    def shape_of(self, x) -> tuple[int, ...]: ...
    def reduce_sum(self, x): ...
    def mean(self, x, axes: tuple[int, ...]): ...
    def size(self, x, dtype: np.dtype): ...
    def barrier(self, xs: list) -> list: ...


def evaluate(func: Function, backend: Backend, tensors: dict[str, Sequence], scalars: dict,
             step_dtype: np.dtype, out_dtypes: dict[str, Sequence[np.dtype]],
             delta_output: str | None = None, per_output: bool = False,
             out_extents: dict[str, str] | None = None, factoring: Factoring = NOT_FACTORED) -> dict[str, list]:
    """Evaluate ``func`` for every parameter; return each output as a list of per-parameter arrays.

    ``tensors`` maps each tensor and leaf input to one array per parameter (``p``
    first: its dtypes set the compute dtypes), ``scalars`` each step input to one
    scalar. ``out_dtypes`` gives each output's storage dtype per parameter.
    ``out_extents`` gives each output's extent (default ``tensor``): a ``leaf`` output
    is one scalar per parameter, a ``step`` output a list of one scalar, stored in
    its only ``out_dtypes`` entry. ``row`` and ``col`` inputs and outputs are stored
    without the axes they reduce (as optax stores Adafactor's ``v_row``, ``v_col``);
    ``factoring`` says which parameters are factored. If
    ``delta_output`` names an output, that output is returned as its change
    (new - old, computed before rounding) rather than its new value.

    With ``per_output``, each output after the first recomputes the tensor values it
    needs from its own copy of the tensor inputs (behind ``backend.barrier``), so the
    outputs share no tensor intermediates: XLA:CPU's sibling multi-output fusion can
    then emit the whole step as one loop (see docs/fusion.md). Step and leaf scalars
    are still computed once and shared.
    """
    params = tensors["p"]
    dtypes = [compute_dtype(backend.dtype_of(x)) for x in params]
    layout = _Layout(backend, params, factoring)
    env: dict[int, object] = {}
    for value in func.inputs:
        if value.type.extent == "step":
            env[id(value)] = backend.convert(scalars[value.name], step_dtype)
        else:
            env[id(value)] = [layout.load(backend.convert(x, dt), i, value.type.extent)
                              for i, (x, dt) in enumerate(zip(tensors[value.name], dtypes, strict=True))]
    leaf_view = _LeafView(func, backend, env, dtypes, layout)
    for op in func.ops:
        _compute(op, backend, env, leaf_view, step_dtype)

    envs = {name: env for name, _ in func.outputs}
    if per_output:
        for name, value in func.outputs[1:]:
            if value.type.extent == "tensor":
                envs[name] = _recompute_tensors(func, value, backend, env, step_dtype, dtypes, layout)

    outputs = {}
    for name, value in func.outputs:
        extent = (out_extents or {}).get(name, "tensor")
        if extent == "step":
            outputs[name] = [backend.convert(env[id(value)], out_dtypes[name][0])]
            continue
        view = _LeafView(func, backend, envs[name], dtypes, layout)
        per_leaf = [layout.store(view(value, i, extent), i, extent) for i in range(len(params))]
        if name == delta_output:
            old = env[id(func.input(name))]
            per_leaf = [backend.apply("sub", [new, old[i]]) for i, new in enumerate(per_leaf)]
        outputs[name] = [backend.convert(x, dt) for x, dt in zip(per_leaf, out_dtypes[name], strict=True)]
    return outputs


class _Layout:
    """Each parameter's shape, and the axes its ``row`` and ``col`` values reduce (kept as size 1)."""

    def __init__(self, backend: Backend, params: list, factoring: Factoring):
        self.backend = backend
        self.shapes = [backend.shape_of(x) for x in params]
        self.axes = [dict(zip(("row", "col"), factoring.axes(shape), strict=True)) for shape in self.shapes]

    def reduced(self, i: int, extent: str) -> tuple[int, ...]:
        return self.axes[i].get(extent, ())

    def kept_shape(self, i: int, extent: str) -> tuple[int, ...]:
        axes = self.reduced(i, extent)
        return tuple(1 if axis in axes else n for axis, n in enumerate(self.shapes[i]))

    def load(self, x, i: int, extent: str):
        """A stored row or col value with its reduced axes put back (size 1); others as they are."""
        return self.backend.reshape(x, self.kept_shape(i, extent)) if self.reduced(i, extent) else x

    def store(self, x, i: int, extent: str):
        axes = self.reduced(i, extent)
        if not axes:
            return x
        return self.backend.reshape(x, tuple(n for axis, n in enumerate(self.shapes[i]) if axis not in axes))


class _LeafView:
    """A value as parameter i sees it, widened to an extent; step scalars are converted once per leaf."""

    def __init__(self, func: Function, backend: Backend, env: dict, dtypes: list[np.dtype], layout: _Layout):
        self.backend, self.env, self.dtypes, self.layout = backend, env, dtypes, layout
        self.params = env[id(func.input("p"))]
        self.converted: dict[tuple[int, int], object] = {}

    def __call__(self, value: Value, i: int, extent: str):
        x = self.env[id(value)]
        if value.type.extent == "step":
            key = (id(value), i)
            if key not in self.converted:
                self.converted[key] = x if value.type.kind == "bool" else self.backend.convert(x, self.dtypes[i])
            x = self.converted[key]
        else:
            x = x[i]
        source = value.type.extent
        if extent in ("step", "leaf") or source == "tensor":
            return x
        target = self.layout.kept_shape(i, extent)
        if source in ("row", "col") and self.backend.shape_of(x) == target:
            return x  # (a row value may be narrower: col_mean of a row is one number per batch)
        if target == self.layout.shapes[i]:
            return self.backend.broadcast(x, self.params[i])  # the parameter's shape may be symbolic
        return self.backend.broadcast_to(x, target)


def _gsum(op, backend, env, view, step_dtype):
    parts = [backend.convert(x, step_dtype) for x in env[id(op.operands[0])]]
    total = parts[0]
    for part in parts[1:]:
        total = backend.apply("add", [total, part])
    return total


def _mean_over(extent):
    def mean(op, backend, env, view, step_dtype):
        return [backend.mean(x, view.layout.reduced(i, extent)) for i, x in enumerate(env[id(op.operands[0])])]
    return mean


# How the evaluator applies each structural op of the op table (those without a NumPy meaning).
STRUCTURAL = {
    "gsum": _gsum,
    "row_mean": _mean_over("row"),
    "col_mean": _mean_over("col"),
    "sum": lambda op, backend, env, view, step_dtype: [backend.reduce_sum(x) for x in env[id(op.operands[0])]],
    "size": lambda op, backend, env, view, step_dtype: [backend.size(x, view.dtypes[i])
                                                        for i, x in enumerate(env[id(op.operands[0])])],
}


def _compute(op: Op, backend: Backend, env: dict, leaf_view: _LeafView, step_dtype: np.dtype) -> None:
    """Evaluate one op into ``env``: once for step values, once per parameter otherwise."""
    extent = op.result.type.extent
    with backend.at(op.loc):
        if op.opcode == "const":
            env[id(op.result)] = backend.constant(op.attr, step_dtype)
        elif op.opcode in STRUCTURAL:
            env[id(op.result)] = STRUCTURAL[op.opcode](op, backend, env, leaf_view, step_dtype)
        elif extent == "step":
            env[id(op.result)] = backend.apply(op.opcode, [env[id(v)] for v in op.operands])
        else:
            env[id(op.result)] = [backend.apply(op.opcode, [leaf_view(v, i, extent) for v in op.operands])
                                  for i in range(len(leaf_view.dtypes))]


def _recompute_tensors(func: Function, output: Value, backend: Backend, env: dict, step_dtype: np.dtype,
                       dtypes: list[np.dtype], layout: "_Layout") -> dict:
    """A copy of ``env`` in which the tensor ops ``output`` depends on are recomputed from fresh inputs."""
    needed = dependencies(func, [output], follow=lambda value: value.type.extent == "tensor")
    fresh = dict(env)
    inputs = [v for v in func.inputs if v.type.extent == "tensor" and id(v) in needed]
    flat = backend.barrier([x for v in inputs for x in env[id(v)]])
    for k, value in enumerate(inputs):
        fresh[id(value)] = flat[k * len(dtypes):(k + 1) * len(dtypes)]
    view = _LeafView(func, backend, fresh, dtypes, layout)
    for op in func.ops:
        if id(op.result) in needed:
            _compute(op, backend, fresh, view, step_dtype)
    return fresh
