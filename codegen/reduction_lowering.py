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

from optgen.ir import dependencies


def lower(ctx, operands, step_dtype, in_place, lower_update, *, max_leaves: int, **params):
    """Lower the primitive ``run_ir`` with ``params`` as reading pass, XLA scalars, update pass.

    ``lower_update(ctx, operands, step_dtype, in_place, **params)`` lowers an elementwise step
    with the own loop (:func:`codegen.primitive._lower_ffi`)."""
    func, n = params["func"], params["n"]
    tensor_names, scalar_names = params["tensor_names"], params["scalar_names"]
    names = [name for name, _ in func.outputs]
    extents = dict(zip(names, params["out_extents"], strict=True))
    stages = reading_pass.split(func, extents)
    tensors = {name: list(operands[k * n : (k + 1) * n]) for k, name in enumerate(tensor_names)}
    avals = {name: list(ctx.avals_in[k * n : (k + 1) * n]) for k, name in enumerate(tensor_names)}
    scalars = list(operands[len(tensor_names) * n :])
    scalar_avals = list(ctx.avals_in[len(tensor_names) * n :])
    param_dtypes = [np.dtype(a.dtype) for a in avals["p"]]
    computed = [compute_dtype(d) for d in param_dtypes]

    sums = _read(
        ctx,
        stages.reading,
        tensors,
        avals,
        scalars,
        scalar_avals,
        param_dtypes,
        scalar_names,
        step_dtype,
        max_leaves,
    )

    # the scalars between the passes, over every parameter
    combine_out = {}
    for name, value in stages.combine.outputs:
        if name in extents:
            combine_out[name] = (extents[name], list(params["out_dtypes"][names.index(name)]))
        elif value.type.extent == "leaf":
            combine_out[name] = ("leaf", computed)
        else:
            combine_out[name] = ("step", [step_dtype])
    given = tensors | {f"_sum{k}": leaf_sums for k, leaf_sums in enumerate(sums)}
    combined = evaluate(
        stages.combine,
        StableHLOBackend(),
        {v.name: given[v.name] for v in stages.combine.inputs if v.type.extent != "step"},
        dict(zip(scalar_names, scalars, strict=True)),
        step_dtype,
        {name: dtypes for name, (_, dtypes) in combine_out.items()},
        out_extents={name: extent for name, (extent, _) in combine_out.items()},
    )

    # the update, with the combined scalars as inputs
    update = stages.update
    u_tensor = tuple(v.name for v in update.inputs if v.type.extent != "step")
    u_scalar = tuple(v.name for v in update.inputs if v.type.extent == "step")
    u_names = [name for name, _ in update.outputs]

    def operand(name):
        return tensors[name] if name in tensors else combined[name]

    def aval(name, k):
        if name in avals:
            return avals[name][k]
        return jax.core.ShapedArray((), combine_out[name][1][k])

    step_values = dict(zip(scalar_names, zip(scalars, scalar_avals, strict=True), strict=True))
    # the combined per-step values the update reads (not the new values of per-step states, which
    # share their names with the inputs that hold the old ones)
    step_values |= {
        name: (combined[name][0], aval(name, 0)) for name in u_scalar if name not in step_values
    }
    u_operands = [x for name in u_tensor for x in operand(name)]
    u_operands += [step_values[name][0] for name in u_scalar]
    u_avals = [aval(name, k) for name in u_tensor for k in range(n)]
    u_avals += [step_values[name][1] for name in u_scalar]
    positions, start = {}, 0  # each original output's results among the primitive's
    for name in names:
        count = 1 if extents[name] == "step" else n
        positions[name], start = range(start, start + count), start + count
    u_out_avals = [ctx.avals_out[k] for name in u_names for k in positions[name]]
    results = lower_update(
        ctx.replace(avals_in=u_avals, avals_out=u_out_avals),
        u_operands,
        step_dtype,
        in_place,
        func=update,
        n=n,
        tensor_names=u_tensor,
        scalar_names=u_scalar,
        out_dtypes=tuple(params["out_dtypes"][names.index(name)] for name in u_names),
        delta_output=params["delta_output"],
        out_extents=tuple(extents[name] for name in u_names),
    )
    by_name, start = {}, 0
    for name in u_names:
        count = len(positions[name])
        by_name[name], start = results[start : start + count], start + count
    return [x for name in names for x in (by_name[name] if name in by_name else combined[name])]


def _read(
    ctx,
    reading,
    tensors,
    avals,
    scalars,
    scalar_avals,
    param_dtypes,
    scalar_names,
    step_dtype,
    max_leaves,
) -> list[list]:
    """Each sum of ``reading`` for every parameter, by calls of the reading pass."""
    if not reading.outputs:
        return []
    read = dependencies(reading, [v for _, v in reading.outputs])
    names = tuple(v.name for v in reading.inputs if v.type.extent != "step" and id(v) in read)
    n = len(param_dtypes)
    sums = [[None] * n for _ in reading.outputs]
    for first in range(0, n, max_leaves):
        leaves = range(first, min(n, first + max_leaves))
        call = cpu_reduce.ReadingCall(
            reading,
            names,
            tuple(scalar_names),
            in_dtypes=tuple(
                tuple(np.dtype(avals[name][k].dtype) for k in leaves) for name in names
            ),
            param_dtypes=tuple(param_dtypes[k] for k in leaves),
            sizes=tuple(int(np.prod(avals["p"][k].shape)) for k in leaves),
            step_dtype=step_dtype,
        )
        items = len(call.plan[1])
        out_avals = [jax.core.ShapedArray((max(items, 1) * call.n_sums,), np.float64)]
        out_avals += [
            jax.core.ShapedArray((), compute_dtype(param_dtypes[k]))
            for _ in reading.outputs
            for k in leaves
        ]
        in_avals = [avals[name][k] for name in names for k in leaves] + scalar_avals
        ins = [tensors[name][k] for name in names for k in leaves] + scalars
        part = ctx.replace(avals_in=in_avals, avals_out=out_avals)
        values = jax.ffi.ffi_lowering(cpu_reduce.target(call))(part, *ins)
        for s in range(call.n_sums):
            for j, k in enumerate(leaves):
                sums[s][k] = values[1 + s * len(leaves) + j]
    return sums
