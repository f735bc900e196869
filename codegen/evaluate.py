"""Run an IR function over every parameter at once, on a pluggable backend.

One evaluator serves both the NumPy reference interpreter and the StableHLO emitter,
so both give ops the same meaning. Each IR value becomes, by its extent:

- ``step``: one scalar, computed once in the step dtype (float32, or float64 when
  JAX's x64 mode is on) and shared by every parameter;
- ``leaf``: one scalar per parameter, in that parameter's compute dtype;
- ``row``, ``col``: one array per parameter, with the axes they reduce kept as size 1
  (which axes, per parameter, is :class:`~optgen.types.Factoring`'s choice);
- ``tensor``: one array per parameter, in that parameter's compute dtype;
- ``cr``, ``rr``, ``cc``: one array per matrix parameter, its batch axes followed by the two
  matrix axes the extent names (``rr``: rows x rows);
- ``axes``: one vector per parameter, its per-axis statistics end to end (as stored).

What a parameter's shape decides is decided when the step is traced (:class:`_Plan`): the
shape constants (``dim``) and what is computed from them alone are Python numbers per
parameter, and at a ``select`` on such a number only the chosen operand is computed for
that parameter, so a matrix branch never runs on a vector.

A parameter's compute dtype is its storage dtype widened to at least float32: low
precision values are loaded, computed in float32, and rounded once on store.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Protocol

import numpy as np
from optgen.codegen import rounding as stochastic

from optgen.diagnostics import InputError, SpecError
from optgen.ir import Function, Loc, Op, Value, dependencies
from optgen.ops import OPS
from optgen.types import NOT_FACTORED, SEPARATE_EXTENTS, Factoring, stored_shape

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
    def round_to(self, x, dtype: np.dtype): ...
    def broadcast(self, x, like): ...
    def broadcast_to(self, x, shape: tuple[int, ...]): ...
    def reshape(self, x, shape: tuple[int, ...]): ...
    def shape_of(self, x) -> tuple[int, ...]: ...
    def slice(self, x, start: int, stop: int): ...
    def concatenate(self, xs: list): ...
    def reduce_sum(self, x): ...
    def mean(self, x, axes: tuple[int, ...]): ...
    def reduce_max(self, x, axes: tuple[int, ...]): ...
    def size(self, x, dtype: np.dtype): ...
    def barrier(self, xs: list) -> list: ...
    def matmul(self, x, y): ...
    def transpose(self, x): ...
    def dim(self, x, axis: int, dtype: np.dtype): ...
    # uint32 arithmetic for stochastic rounding (codegen/rounding.py)
    def integer(self, opcode: str, operands: list): ...
    def bitcast(self, x, dtype: np.dtype): ...
    def element_index(self, x): ...


def evaluate(
    func: Function,
    backend: Backend,
    tensors: dict[str, Sequence],
    scalars: dict,
    step_dtype: np.dtype,
    out_dtypes: dict[str, Sequence[np.dtype]],
    delta_output: str | None = None,
    per_output: bool = False,
    out_extents: dict[str, str] | None = None,
    factoring: Factoring = NOT_FACTORED,
    rounding: str = "nearest",
    leaf_ids: Sequence | None = None,
) -> dict[str, list]:
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

    With ``rounding="stochastic"``, float32 values stored in bfloat16 are rounded
    stochastically (:mod:`codegen.rounding`), from a hash of the step input ``t``, the
    parameter's number (``leaf_ids``: one uint32 scalar per parameter, by default its
    position) and each element's index; other stores round to nearest.
    """
    params = tensors["p"]
    dtypes = [compute_dtype(backend.dtype_of(x)) for x in params]
    layout = _Layout(backend, params, factoring)
    plan = _Plan(func, layout)
    env: dict[int, object] = {}
    for value in func.inputs:
        if value.type.extent == "step":
            env[id(value)] = backend.convert(scalars[value.name], step_dtype)
        else:
            env[id(value)] = [
                layout.load(backend.convert(x, dt), i, value.type.extent)
                for i, (x, dt) in enumerate(zip(tensors[value.name], dtypes, strict=True))
            ]
    leaf_view = _LeafView(func, backend, env, dtypes, layout, plan)
    for op in func.ops:
        _compute(op, backend, env, leaf_view, step_dtype)

    envs = {name: env for name, _ in func.outputs}
    if per_output:
        for name, value in func.outputs[1:]:
            if value.type.extent == "tensor":
                envs[name] = _recompute_tensors(
                    func, value, backend, env, step_dtype, dtypes, layout, plan
                )

    seeds = _seeds(func, backend, env, rounding, leaf_ids, len(params))
    outputs = {}
    for j, (name, value) in enumerate(func.outputs):
        extent = (out_extents or {}).get(name, "tensor")
        if extent == "step":
            outputs[name] = [backend.convert(env[id(value)], out_dtypes[name][0])]
            continue
        view = _LeafView(func, backend, envs[name], dtypes, layout, plan)
        per_leaf = [layout.store(view(value, i, extent), i, extent) for i in range(len(params))]
        if name == delta_output:
            old = env[id(func.input(name))]
            per_leaf = [backend.apply("sub", [new, old[i]]) for i, new in enumerate(per_leaf)]
        outputs[name] = [
            _store(backend, x, dt, seeds(i, j))
            for i, (x, dt) in enumerate(zip(per_leaf, out_dtypes[name], strict=True))
        ]
    return outputs


def _seeds(func: Function, backend, env, rounding: str, leaf_ids, n: int):
    """(parameter, output) -> the stochastic-rounding key of their stores, or None (to nearest)."""
    if rounding == "nearest":
        return lambda i, j: None
    if rounding != "stochastic" or not any(v.name == "t" for v in func.inputs):
        raise ValueError(f"rounding {rounding!r} needs 'stochastic' and a step input 't'")
    t = env[id(func.input("t"))]
    ids = leaf_ids or [backend.constant(i, np.uint32) for i in range(n)]
    return lambda i, j: stochastic.key(backend, t, ids[i], j)


def _store(backend, x, dtype, seed):
    """``x`` stored in ``dtype``: stochastically where ``seed`` is given and it applies."""
    if seed is not None and stochastic.applies(backend, x, dtype):
        return stochastic.round_to_bfloat16(backend, x, seed)
    return backend.convert(x, dtype)


class _Layout:
    """Each parameter's shape, and the axes its ``row`` and ``col`` values reduce (kept
    as size 1).
    """

    def __init__(self, backend: Backend, params: list, factoring: Factoring):
        self.backend = backend
        self.shapes = [backend.shape_of(x) for x in params]
        self.storage = [backend.dtype_of(x) for x in params]  # what ``stored`` rounds to
        self.axes = [
            dict(zip(("row", "col"), factoring.axes(shape), strict=True)) for shape in self.shapes
        ]

    def reduced(self, i: int, extent: str) -> tuple[int, ...]:
        return self.axes[i].get(extent, ())

    def kept_shape(self, i: int, extent: str) -> tuple[int, ...]:
        """The shape of a value of ``extent``: a row or col value's reduced axes are
        kept as size 1.
        """
        shape = self.shapes[i]
        # a vector's statistics are its elements; a larger tensor needs static sizes
        if extent == "axes":
            return (
                shape
                if len(shape) == 1
                else stored_shape(self.static_shape(i), extent, NOT_FACTORED)
            )
        if extent in ("cr", "rr", "cc"):
            return stored_shape(shape, extent, NOT_FACTORED)
        axes = self.reduced(i, extent)
        return tuple(1 if axis in axes else n for axis, n in enumerate(shape))

    def static_shape(self, i: int) -> tuple[int, ...]:
        """Parameter i's shape, which must be known when the step is traced (E390 otherwise)."""
        shape = self.shapes[i]
        if all(isinstance(n, int) and n >= 0 for n in shape):  # MLIR marks a symbolic size < 0
            return shape
        raise InputError(
            f"a parameter of {len(shape)} axes with a symbolic size reaches a per-axis statistic "
            "(axis_max, axis_min or an 'axes' state), whose length is the sum of the sizes",
            hint="export with sizes rather than names (--shape 64,32), or use a vector",
            code="E390",
        )

    def dim(self, i: int, name: str) -> int | None:
        """A shape constant of parameter ``i`` (optgen.ops.DIMS), or None where the shape is
        symbolic.
        """
        shape = self.shapes[i]
        size = {
            "ndim": len(shape),
            "rows": shape[-2] if len(shape) >= 2 else 1,
            "cols": shape[-1] if shape else 1,
        }[name]
        # MLIR marks a symbolic size < 0
        return size if isinstance(size, int) and size >= 0 else None

    def load(self, x, i: int, extent: str):
        """A stored row or col value with its reduced axes put back (size 1); others as they are."""
        return self.backend.reshape(x, self.kept_shape(i, extent)) if self.reduced(i, extent) else x

    def store(self, x, i: int, extent: str):
        axes = self.reduced(i, extent)
        if not axes:
            return x
        return self.backend.reshape(
            x, tuple(n for axis, n in enumerate(self.shapes[i]) if axis not in axes)
        )


class _Plan:
    """What each parameter's shape decides when the step is traced.

    ``static[i]`` holds, for parameter i, the value of every op computed from constants and
    shape constants alone (``ndim == 2``); ``needed[i]`` the ids of the values parameter i
    needs: walking back from the outputs, a ``select`` whose condition is in ``static[i]``
    leads only to the operand it chooses. A per-step sum over parameters (``gsum``) needs its
    operand on every parameter.
    """

    def __init__(self, func: Function, layout: _Layout):
        n = len(layout.shapes)
        self.static: list[dict[int, object]] = [{} for _ in range(n)]
        for op in func.ops:
            for i, known in enumerate(self.static):
                value = _static_value(op, known, layout, i)
                if value is not None:
                    known[id(op.result)] = value
        self.producers = {id(op.result): op for op in func.ops}
        roots, extra = [v for _, v in func.outputs], []
        while True:
            self.needed = [self._walk(i, roots + extra) for i in range(n)]
            wanted = {
                id(op.operands[0]): op.operands[0]
                for op in func.ops
                if op.opcode == "gsum" and any(id(op.result) in needed for needed in self.needed)
            }
            if set(wanted) <= set(map(id, extra)):
                break
            extra = list(wanted.values())
        # Per-step outputs are computed even with no parameters at all.
        self.any_needed = set().union(
            self._walk(None, [v for _, v in func.outputs if v.type.extent == "step"]), *self.needed
        )

    def chosen(self, op: Op, i: int | None) -> Value | None:
        """The operand a select takes for parameter i, if its condition is known when tracing."""
        cond = (
            self.static[i].get(id(op.operands[0]))
            if op.opcode == "select" and i is not None
            else None
        )
        return None if cond is None else op.operands[1] if cond else op.operands[2]

    def _walk(self, i: int | None, roots, stop=()) -> set[int]:
        """Ids of ``roots`` and what parameter i computes them from (not walking past the
        results of the ops named in ``stop``)."""
        found, stack = set(), list(roots)
        while stack:
            value = stack.pop()
            if id(value) in found:
                continue
            found.add(id(value))
            op = self.producers.get(id(value))
            if op is not None and op.opcode not in stop:
                chosen = self.chosen(op, i)
                stack.extend(op.operands if chosen is None else (chosen,))
        return found


def needed_by(
    func: Function, shape: tuple[int, ...], roots, stop=(), factoring: Factoring = NOT_FACTORED
) -> set[int]:
    """Ids of ``roots`` and of the values one parameter of ``shape`` computes them from: only the
    branch it takes at a ``select`` on its shape, and not past the results of ``stop``'s ops."""
    layout = _Layout(_Shapes(), [shape], factoring)
    return _Plan(func, layout)._walk(0, roots, stop)


class _Shapes:
    """A backend whose arrays are their shapes: enough to plan for a parameter of a given shape."""

    def shape_of(self, x):
        return tuple(x)

    def dtype_of(self, x):
        return None  # planning reads shapes only


def _static_value(op: Op, known: dict, layout: _Layout, i: int):
    """The value of ``op`` for parameter i if constants and shape constants decide it, else None."""
    if op.opcode == "const":
        return op.attr
    if op.opcode == "dim":
        return layout.dim(i, op.attr)
    if OPS[op.opcode].numpy is None or not all(id(v) in known for v in op.operands):
        return None
    args = [
        np.asarray(known[id(v)], dtype=bool if isinstance(known[id(v)], bool) else np.float64)
        for v in op.operands
    ]
    with np.errstate(all="ignore"):
        result = OPS[op.opcode].numpy(*args)
    return bool(result) if op.result.type.kind == "bool" else float(result)


class _LeafView:
    """A value as parameter i sees it, widened to an extent; step scalars are converted once per
    leaf.
    """

    def __init__(
        self,
        func: Function,
        backend: Backend,
        env: dict,
        dtypes: list[np.dtype],
        layout: _Layout,
        plan: _Plan,
    ):
        self.backend, self.env, self.dtypes, self.layout, self.plan = (
            backend,
            env,
            dtypes,
            layout,
            plan,
        )
        self.params = env[id(func.input("p"))]
        self.converted: dict[tuple[int, int], object] = {}

    def __call__(self, value: Value, i: int, extent: str):
        x = self.env[id(value)]
        if value.type.extent == "step":
            key = (id(value), i)
            if key not in self.converted:
                self.converted[key] = (
                    x if value.type.kind == "bool" else self.backend.convert(x, self.dtypes[i])
                )
            x = self.converted[key]
        else:
            x = x[i]
        source = value.type.extent
        if (
            extent in ("step", "leaf")
            or source == "tensor"
            or (source == extent and extent in SEPARATE_EXTENTS)
        ):
            return x
        target = self.layout.kept_shape(i, extent)
        if source in ("row", "col") and self.backend.shape_of(x) == target:
            return x  # (a row value may be narrower: col_mean of a row is one number per batch)
        if target == self.layout.shapes[i]:
            # the parameter's shape may be symbolic
            return self.backend.broadcast(x, self.params[i])
        return self.backend.broadcast_to(x, target)


def _expect_representable(op: Op, dtype: np.dtype) -> None:
    """A constant (a literal, or folded from literals) that ``dtype`` turns into inf is refused:
    ``1e300`` is fine in float64 and inf in float32."""
    value = op.attr
    if isinstance(value, bool) or not np.isfinite(value):
        return
    with np.errstate(over="ignore"):
        if np.isfinite(np.asarray(value, dtype)):
            return
    where = f"{op.loc.file}:{op.loc.line}:{op.loc.col}: " if op.loc else ""
    raise SpecError(
        f"{where}the constant {value:g} is beyond {np.dtype(dtype).name} (it would be inf)",
        hint=f"use a constant within {np.dtype(dtype).name}'s range (about "
        f"{np.finfo(dtype).max:.1e}), or float64 parameters (jax_enable_x64)",
        code="E225",
    )


def _gsum(op, backend, env, view, step_dtype):
    parts = [backend.convert(x, step_dtype) for x in env[id(op.operands[0])]]
    total = parts[0]
    for part in parts[1:]:
        total = backend.apply("add", [total, part])
    return total


def _dim(op, backend, view, i):
    size = view.layout.dim(i, op.attr)
    if size is not None:
        return backend.constant(float(size), view.dtypes[i])
    rank = len(view.layout.shapes[i])  # a symbolic axis: read it at run time
    return backend.dim(view.params[i], rank - (2 if op.attr == "rows" else 1), view.dtypes[i])


def _matrices(op, view, i):
    """The operands of a matrix op for parameter i, which must be a matrix (at least two axes)."""
    shape = view.layout.shapes[i]
    if len(shape) < 2:
        where = f" at {op.loc.file}:{op.loc.line}:{op.loc.col}" if op.loc else ""
        raise InputError(
            f"a parameter of shape {tuple(shape)} reaches the matrix op '{op.opcode}'{where}, but "
            "it is not a matrix (it needs at least two axes)",
            hint="choose by shape in the spec: 'if ndim == 2:' ... 'else:' ...",
            code="E360",
        )
    return [view(v, i, v.type.extent) for v in op.operands]


def _eye(op, backend, view, i):
    """Identity matrices shaped as the operand (square: rows x rows or columns x columns)."""
    (x,) = _matrices(op, view, i)
    shape = backend.shape_of(x)
    eye = np.broadcast_to(np.eye(shape[-1]), shape)
    return backend.constant(eye, backend.dtype_of(x))


def _operand(op, view, i):
    return view.env[id(op.operands[0])][i]


def _stored(op, backend, view, i):
    """The operand rounded to parameter i's storage dtype and widened back to its compute dtype
    (itself where the two are alike: float32 and float64 parameters)."""
    x, storage = view(op.operands[0], i, op.result.type.extent), view.layout.storage[i]
    return x if storage == view.dtypes[i] else backend.round_to(x, storage)


def _axis_max(op, backend, view, i):
    """Each axis's slice maxima, end to end (a vector's slices are its elements; a 0-d parameter
    is its only slice)."""
    x, rank = _operand(op, view, i), len(view.layout.shapes[i])
    if rank <= 1:
        return x if rank else backend.reshape(x, (1,))
    shape = view.layout.static_shape(i)
    return backend.concatenate(
        [
            backend.reshape(
                backend.reduce_max(x, tuple(a for a in range(rank) if a != axis)), (shape[axis],)
            )
            for axis in range(rank)
        ]
    )


def _axis_min(op, backend, view, i):
    """At each element, the least of the statistics of the slices through it."""
    v, rank = _operand(op, view, i), len(view.layout.shapes[i])
    if rank <= 1:
        return v if rank else backend.reshape(v, ())
    shape = view.layout.static_shape(i)
    least, start = None, 0
    for axis, size in enumerate(shape):
        # this axis's statistics, along it
        along = tuple(size if a == axis else 1 for a in range(rank))
        part = backend.broadcast_to(
            backend.reshape(backend.slice(v, start, start + size), along), shape
        )
        least, start = part if least is None else backend.apply("min", [least, part]), start + size
    return least


# How the evaluator applies each structural op of the op table (those without a NumPy meaning):
# once per parameter that needs it, except gsum, which sums a per-parameter value into one.
PER_LEAF = {
    "dim": _dim,
    "matmul": lambda op, backend, view, i: backend.matmul(*_matrices(op, view, i)),
    "transpose": lambda op, backend, view, i: backend.transpose(*_matrices(op, view, i)),
    "eye": _eye,
    "row_mean": lambda op, backend, view, i: backend.mean(
        _operand(op, view, i), view.layout.reduced(i, "row")
    ),
    "col_mean": lambda op, backend, view, i: backend.mean(
        _operand(op, view, i), view.layout.reduced(i, "col")
    ),
    "row_max": lambda op, backend, view, i: backend.reduce_max(
        _operand(op, view, i), view.layout.reduced(i, "row")
    ),
    "col_max": lambda op, backend, view, i: backend.reduce_max(
        _operand(op, view, i), view.layout.reduced(i, "col")
    ),
    "axis_max": _axis_max,
    "axis_min": _axis_min,
    "sum": lambda op, backend, view, i: backend.reduce_sum(_operand(op, view, i)),
    "size": lambda op, backend, view, i: backend.size(_operand(op, view, i), view.dtypes[i]),
    "stored": _stored,
}
STRUCTURAL = set(PER_LEAF) | {"gsum"}
# The structural ops that read one element to write one (per parameter only for its dtype).
ELEMENTWISE_STRUCTURAL = ("stored",)


def _compute(
    op: Op, backend: Backend, env: dict, leaf_view: _LeafView, step_dtype: np.dtype
) -> None:
    """Evaluate one op into ``env``: once for step values, once per parameter otherwise, and only
    where a parameter needs it (:class:`_Plan`)."""
    extent, plan = op.result.type.extent, leaf_view.plan
    if id(op.result) not in plan.any_needed:
        return
    with backend.at(op.loc):
        if op.opcode == "const":
            _expect_representable(op, step_dtype)
            env[id(op.result)] = backend.constant(op.attr, step_dtype)
        elif op.opcode == "gsum":
            env[id(op.result)] = _gsum(op, backend, env, leaf_view, step_dtype)
        elif op.opcode in PER_LEAF:
            env[id(op.result)] = [
                PER_LEAF[op.opcode](op, backend, leaf_view, i) if id(op.result) in needed else None
                for i, needed in enumerate(plan.needed)
            ]
        elif extent == "step":
            env[id(op.result)] = backend.apply(op.opcode, [env[id(v)] for v in op.operands])
        else:
            env[id(op.result)] = [
                _elementwise(op, backend, leaf_view, i, extent) if id(op.result) in needed else None
                for i, needed in enumerate(plan.needed)
            ]


def _elementwise(op: Op, backend: Backend, leaf_view: _LeafView, i: int, extent: str):
    chosen = leaf_view.plan.chosen(op, i)
    if chosen is not None:  # a select on the parameter's shape: only the branch it takes exists
        return leaf_view(chosen, i, extent)
    return backend.apply(op.opcode, [leaf_view(v, i, extent) for v in op.operands])


def _recompute_tensors(
    func: Function,
    output: Value,
    backend: Backend,
    env: dict,
    step_dtype: np.dtype,
    dtypes: list[np.dtype],
    layout: _Layout,
    plan: _Plan,
) -> dict:
    """A copy of ``env`` in which the tensor ops ``output`` depends on are recomputed from fresh
    inputs.
    """
    needed = dependencies(func, [output], follow=lambda value: value.type.extent == "tensor")
    fresh = dict(env)
    inputs = [v for v in func.inputs if v.type.extent == "tensor" and id(v) in needed]
    flat = backend.barrier([x for v in inputs for x in env[id(v)]])
    for k, value in enumerate(inputs):
        fresh[id(value)] = flat[k * len(dtypes) : (k + 1) * len(dtypes)]
    view = _LeafView(func, backend, fresh, dtypes, layout, plan)
    for op in func.ops:
        if id(op.result) in needed:
            _compute(op, backend, fresh, view, step_dtype)
    return fresh
