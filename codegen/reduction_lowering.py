"""A step with reductions as calls of optgen's own CPU loop: one reading pass, one update pass.

The step is cut into stages (:mod:`codegen.reading_pass`). Per :data:`FFI_MAX_LEAVES`
parameters, a call of the reading pass (:mod:`codegen.cpu_reduce`) sums what the step sums;
XLA computes the few scalars that follow from the sums over every parameter (norms, trust
ratios, global sums, per-step outputs); then the update runs as any elementwise step does,
those scalars among its inputs. Every per-element input is read twice at most (once per
pass) and every output written once: the pass-structure minimum.
"""

from __future__ import annotations

import jax
import numpy as np
from optgen.codegen import cpu_reduce, reading_pass
from optgen.codegen.evaluate import compute_dtype, evaluate
from optgen.codegen.stablehlo import StableHLOBackend

from optgen.ir import Function, dependencies


class _Operands:
    """Lowered values and their avals by input name: a list per parameter, or one per step."""

    def __init__(self, n: int):
        self.n = n
        self.per_parameter: dict[str, tuple[list, list]] = {}
        self.per_step: dict[str, tuple] = {}

    def add(self, name: str, values: list, avals: list, per_step: bool) -> None:
        """Add ``name`` unless it is there (a per-step state's new value keeps the name of the
        input holding the old one, which is what the update reads)."""
        table = self.per_step if per_step else self.per_parameter
        table.setdefault(name, (values[0], avals[0]) if per_step else (values, avals))

    def flat(self, func: Function) -> tuple[list, list]:
        """``func``'s operands in the primitive's order (each per-parameter input for every
        parameter, then the per-step inputs), and their avals."""
        values, avals = [], []
        for v in func.inputs:
            if v.type.extent != "step":
                values += self.per_parameter[v.name][0]
                avals += self.per_parameter[v.name][1]
        for v in func.inputs:
            if v.type.extent == "step":
                values.append(self.per_step[v.name][0])
                avals.append(self.per_step[v.name][1])
        return values, avals


def lower(ctx, operands, step_dtype, in_place, lower_update, *, max_leaves: int, **params):
    """Lower the primitive ``run_ir`` with ``params`` as reading pass, XLA scalars, update pass.

    ``lower_update(ctx, operands, step_dtype, in_place, **params)`` lowers an elementwise step
    with the own loop (:func:`codegen.primitive._lower_ffi`)."""
    func, n = params["func"], params["n"]
    names = [name for name, _ in func.outputs]
    extents = dict(zip(names, params["out_extents"], strict=True))
    stages = reading_pass.split(func, extents)
    given = _Operands(n)
    for k, name in enumerate(params["tensor_names"]):
        part = slice(k * n, (k + 1) * n)
        given.add(name, list(operands[part]), list(ctx.avals_in[part]), per_step=False)
    first = len(params["tensor_names"]) * n
    for k, name in enumerate(params["scalar_names"]):
        given.add(name, [operands[first + k]], [ctx.avals_in[first + k]], per_step=True)
    param_dtypes = [np.dtype(a.dtype) for a in given.per_parameter["p"][1]]

    for k, sums in enumerate(
        _read(ctx, stages.reading, given, param_dtypes, step_dtype, max_leaves)
    ):
        dtypes = [compute_dtype(d) for d in param_dtypes]
        given.add(f"_sum{k}", sums, [jax.core.ShapedArray((), d) for d in dtypes], per_step=False)

    # the scalars between the passes, over every parameter, by XLA
    out_dtypes = {}
    for name, value in stages.combine.outputs:
        if name in extents:
            out_dtypes[name] = list(params["out_dtypes"][names.index(name)])
        else:
            out_dtypes[name] = (
                [compute_dtype(d) for d in param_dtypes]
                if value.type.extent == "leaf"
                else [step_dtype]
            )
    out_extents = {name: extents.get(name, v.type.extent) for name, v in stages.combine.outputs}
    combined = evaluate(
        stages.combine,
        StableHLOBackend(),
        {name: xs for name, (xs, _) in given.per_parameter.items()},
        {name: x for name, (x, _) in given.per_step.items()},
        step_dtype,
        out_dtypes,
        out_extents=out_extents,
    )
    for name, values in combined.items():
        avals = [jax.core.ShapedArray((), d) for d in out_dtypes[name]]
        given.add(name, values, avals, per_step=out_extents[name] == "step")

    # the update, with the combined scalars among its inputs
    update = stages.update
    u_names = [name for name, _ in update.outputs]
    positions, start = {}, 0  # each output's results among the primitive's
    for name in names:
        count = 1 if extents[name] == "step" else n
        positions[name], start = range(start, start + count), start + count
    u_operands, u_avals = given.flat(update)
    results = lower_update(
        ctx.replace(
            avals_in=u_avals,
            avals_out=[ctx.avals_out[k] for name in u_names for k in positions[name]],
        ),
        u_operands,
        step_dtype,
        in_place,
        func=update,
        n=n,
        tensor_names=tuple(v.name for v in update.inputs if v.type.extent != "step"),
        scalar_names=tuple(v.name for v in update.inputs if v.type.extent == "step"),
        out_dtypes=tuple(params["out_dtypes"][names.index(name)] for name in u_names),
        delta_output=params["delta_output"],
        out_extents=tuple(extents[name] for name in u_names),
        scaled_in=(),  # (a step with q8 state does not come here: codegen/primitive.py)
        rounding=params["rounding"],
    )
    by_name, start = {}, 0
    for name in u_names:
        count = len(positions[name])
        by_name[name], start = results[start : start + count], start + count
    return [x for name in names for x in (by_name[name] if name in by_name else combined[name])]


def _read(ctx, reading, given: _Operands, param_dtypes, step_dtype, max_leaves) -> list[list]:
    """Each sum of ``reading`` for every parameter, by calls of the reading pass."""
    if not reading.outputs:
        return []
    read = dependencies(reading, [v for _, v in reading.outputs])
    names = tuple(v.name for v in reading.inputs if v.type.extent != "step" and id(v) in read)
    scalar_names = tuple(v.name for v in reading.inputs if v.type.extent == "step")
    n = len(param_dtypes)
    sums = [[None] * n for _ in reading.outputs]
    for first in range(0, n, max_leaves):
        leaves = range(first, min(n, first + max_leaves))
        avals = {name: given.per_parameter[name][1] for name in names + ("p",)}
        call = cpu_reduce.ReadingCall(
            reading,
            names,
            scalar_names,
            in_dtypes=tuple(
                tuple(np.dtype(avals[name][k].dtype) for k in leaves) for name in names
            ),
            param_dtypes=tuple(param_dtypes[k] for k in leaves),
            sizes=tuple(int(np.prod(avals["p"][k].shape)) for k in leaves),
            step_dtype=step_dtype,
        )
        out_avals = [jax.core.ShapedArray((max(len(call.plan[1]), 1) * call.n_sums,), np.float64)]
        out_avals += [
            jax.core.ShapedArray((), compute_dtype(param_dtypes[k]))
            for _ in reading.outputs
            for k in leaves
        ]
        ins = [given.per_parameter[name][0][k] for name in names for k in leaves]
        in_avals = [avals[name][k] for name in names for k in leaves]
        ins += [given.per_step[name][0] for name in scalar_names]
        in_avals += [given.per_step[name][1] for name in scalar_names]
        part = ctx.replace(avals_in=in_avals, avals_out=out_avals)
        values = jax.ffi.ffi_lowering(cpu_reduce.target(call))(part, *ins)
        for s in range(call.n_sums):
            for j, k in enumerate(leaves):
                sums[s][k] = values[1 + s * len(leaves) + j]
    return sums
