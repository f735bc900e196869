"""A JAX primitive that runs an IR function; its lowering rule emits the generated StableHLO.

Because the optimizer is a primitive inside JAX's own lowering, a step composes with a
user's ``jax.jit``, donation, sharding and ``jax.export`` like any jnp code, and XLA
fuses it with whatever surrounds it.

Under ``jax.jvp``, ``jax.grad``, ``jax.linearize`` and ``jax.vmap`` the primitive takes
the plain path instead: the same IR through the same evaluator, computed with jnp
(:mod:`codegen.jnp_backend`), which JAX differentiates, transposes and batches like any
jnp code. Only transformed calls pay for it; an untransformed step stays the fused kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np
from jax._src import sharding_impls
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from optgen.codegen import cpu_kernel, fusion, reading_pass, reduction_lowering
from optgen.codegen.evaluate import evaluate
from optgen.codegen.jnp_backend import jnp_backend
from optgen.codegen.stablehlo import StableHLOBackend

from optgen.ir import Function
from optgen.types import NOT_FACTORED, Factoring, stored_shape

run_ir_p = Primitive("optgen_run_ir")
# Parameters per call of the CPU loop: XLA's compile time grows faster than linearly with the
# aliased operands of one custom call (1,000 parameters: 23 s in one call, 2.4 s in calls of 64).
FFI_MAX_LEAVES = 64
run_ir_p.multiple_results = True


def run_ir(
    func: Function,
    tensors: dict[str, Sequence[jax.Array]],
    scalars: dict[str, jax.Array],
    out_dtypes: dict[str, Sequence[np.dtype]],
    delta_output: str | None = None,
    lowering: str = "auto",
    out_extents: dict[str, str] | None = None,
    factoring: Factoring = NOT_FACTORED,
    in_place: bool = False,
) -> dict[str, list]:
    """Run ``func`` over every parameter: the JAX counterpart of :func:`codegen.interpret.interpret`.

    ``tensors`` maps each tensor and leaf input to one array per parameter, ``scalars``
    each step input to a 0-d array whose dtype is the step dtype. Returns each output's
    arrays, stored in ``out_dtypes``; ``out_extents`` and ``factoring`` as in
    :func:`codegen.evaluate.evaluate`.
    ``lowering`` is one of :data:`codegen.fusion.LOWERINGS`. With ``in_place``, an output named
    like an input may be stored over it (a donated step then writes each buffer where it read it).
    """
    tensor_names = tuple(v.name for v in func.inputs if v.type.extent != "step")
    scalar_names = tuple(v.name for v in func.inputs if v.type.extent == "step")
    n = len(tensors["p"])
    operands = [x for name in tensor_names for x in tensors[name]] + [
        scalars[s] for s in scalar_names
    ]
    out_names = tuple(name for name, _ in func.outputs)
    extents = tuple((out_extents or {}).get(name, "tensor") for name in out_names)
    flat = run_ir_p.bind(
        *operands,
        func=func,
        n=n,
        tensor_names=tensor_names,
        scalar_names=scalar_names,
        out_dtypes=tuple(tuple(np.dtype(d) for d in out_dtypes[name]) for name in out_names),
        delta_output=delta_output,
        lowering=lowering,
        out_extents=extents,
        factoring=factoring,
        in_place=in_place,
    )
    outputs, start = {}, 0
    for name, extent in zip(out_names, extents, strict=True):
        count = 1 if extent == "step" else n
        outputs[name], start = list(flat[start : start + count]), start + count
    return outputs


def _split(operands, n, tensor_names, scalar_names):
    tensors = {name: list(operands[i * n : (i + 1) * n]) for i, name in enumerate(tensor_names)}
    scalars = dict(zip(scalar_names, operands[len(tensor_names) * n :], strict=True))
    return tensors, scalars


@run_ir_p.def_abstract_eval
def _abstract_eval(
    *operands,
    func,
    n,
    tensor_names,
    scalar_names,
    out_dtypes,
    delta_output,
    lowering,
    out_extents,
    factoring,
    in_place,
):
    params = operands[:n]
    return [
        jax.core.ShapedArray(
            () if extent == "step" else stored_shape(p.shape, extent, factoring), dtype
        )
        for dtypes, extent in zip(out_dtypes, out_extents, strict=True)
        for p, dtype in zip(params if extent != "step" else [None], dtypes, strict=True)
    ]


def _evaluate(
    backend,
    step_dtype,
    operands,
    func,
    n,
    tensor_names,
    scalar_names,
    out_dtypes,
    delta_output,
    out_extents,
    factoring,
    per_output=False,
) -> list:
    tensors, scalars = _split(operands, n, tensor_names, scalar_names)
    names = [name for name, _ in func.outputs]
    outputs = evaluate(
        func,
        backend,
        tensors,
        scalars,
        step_dtype,
        dict(zip(names, out_dtypes, strict=True)),
        delta_output,
        per_output=per_output,
        out_extents=dict(zip(names, out_extents, strict=True)),
        factoring=factoring,
    )
    return [x for name in names for x in outputs[name]]


def _step_dtype(avals, n, tensor_names, scalar_names) -> np.dtype:
    return np.dtype(avals[len(tensor_names) * n].dtype) if scalar_names else np.dtype(np.float32)


def _lower(ctx, *operands, lowering, in_place, **params):
    step_dtype = _step_dtype(
        ctx.avals_in, params["n"], params["tensor_names"], params["scalar_names"]
    )
    # Only per-element outputs decide how the loops fuse.
    loop_dtypes = [
        d
        for d, extent in zip(params["out_dtypes"], params["out_extents"], strict=True)
        if extent == "tensor"
    ]
    where = fusion.Where(
        tuple(ctx.module_context.platforms),
        _one_device(ctx.module_context),
        ctx.module_context.lowering_parameters.for_export,
    )
    symbolic = any(not isinstance(d, int) for aval in ctx.avals_in for d in aval.shape)
    refusal = (
        "a shape is symbolic"
        if symbolic
        else cpu_kernel.unsupported(params["func"], params["out_extents"])
    )
    choice = fusion.resolve(
        lowering,
        where,
        loop_dtypes,
        refusal,
        fusion.own_loop_preferred(params["func"], loop_dtypes),
    )
    if choice == "ffi" and reading_pass.has_reductions(params["func"]):
        return reduction_lowering.lower(
            ctx, operands, step_dtype, in_place, _lower_ffi, max_leaves=FFI_MAX_LEAVES, **params
        )
    if choice == "ffi":
        return _lower_ffi(ctx, operands, step_dtype, in_place, **params)
    return _evaluate(
        StableHLOBackend(), step_dtype, operands, per_output=choice == "per-output", **params
    )


def _one_device(module_context) -> bool:
    axes = module_context.axis_context
    return isinstance(axes, sharding_impls.ShardingContext) and axes.num_devices == 1


def _lower_ffi(
    ctx,
    operands,
    step_dtype,
    in_place,
    *,
    func,
    n,
    tensor_names,
    scalar_names,
    out_dtypes,
    delta_output,
    out_extents,
    **_,
):
    """The step as calls of optgen's own CPU loop (codegen/cpu_kernel.py), one per
    :data:`FFI_MAX_LEAVES` parameters; the first also writes the per-step outputs."""
    starts = np.cumsum([0] + [n if extent == "tensor" else 1 for extent in out_extents])[
        :-1
    ]  # each output's first
    results = [None] * len(ctx.avals_out)
    for first in range(0, n, FFI_MAX_LEAVES):
        leaves = range(first, min(n, first + FFI_MAX_LEAVES))
        ins = [t * n + leaf for t in range(len(tensor_names)) for leaf in leaves]
        ins += range(len(tensor_names) * n, len(operands))
        outs = _part_outputs(starts, out_extents, leaves, first == 0)
        avals = [ctx.avals_in[k] for k in ins]
        call = cpu_kernel.Call(
            func,
            tensor_names,
            scalar_names,
            in_dtypes=tuple(
                tuple(np.dtype(avals[t * len(leaves) + k].dtype) for k in range(len(leaves)))
                for t in range(len(tensor_names))
            ),
            sizes=tuple(int(np.prod(avals[k].shape)) for k in range(len(leaves))),
            out_names=tuple(name for name, _ in func.outputs),
            out_extents=out_extents,
            out_dtypes=tuple(
                tuple(dtypes[leaf] for leaf in leaves) if extent == "tensor" else dtypes
                for dtypes, extent in zip(out_dtypes, out_extents, strict=True)
            ),
            step_dtype=step_dtype,
            delta_output=delta_output,
            in_place=in_place,
            step_outputs=first == 0,
        )
        aliases = {
            t * len(leaves) + k: call.ret_offsets[j] + k
            for j, t in call.aliases.items()
            for k in range(len(leaves))
        }
        part = ctx.replace(avals_in=avals, avals_out=[ctx.avals_out[k] for k in outs])
        values = jax.ffi.ffi_lowering(cpu_kernel.target(call), operand_output_aliases=aliases)(
            part, *[operands[k] for k in ins]
        )
        for k, value in zip(outs, values, strict=True):
            results[k] = value
    return results


def _part_outputs(starts, out_extents, leaves: range, first_part: bool) -> list[int]:
    """Which of the primitive's results one call of the loop makes: its parameters' values of
    each per-element output and, for the first call only, each per-step output."""
    outs = []
    for start, extent in zip(starts, out_extents, strict=True):
        if extent == "tensor":
            outs += [int(start) + leaf for leaf in leaves]
        elif first_part:
            outs.append(int(start))
    return outs


def _plain(*operands, lowering, in_place, **params) -> list:
    """The primitive's meaning in jnp ops (what its transformation rules differentiate and batch)."""
    step_dtype = _step_dtype(operands, params["n"], params["tensor_names"], params["scalar_names"])
    return _evaluate(jnp_backend(), step_dtype, operands, **params)


def _jvp(primals, tangents, **params):
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    return jax.jvp(functools.partial(_plain, **params), list(primals), tangents)


def _batch(args, dims, **params):
    outputs = jax.vmap(functools.partial(_plain, **params), in_axes=list(dims))(*args)
    return outputs, [0] * len(outputs)


_PARAMS = (
    "func",
    "n",
    "tensor_names",
    "scalar_names",
    "out_dtypes",
    "delta_output",
    "lowering",
    "out_extents",
    "factoring",
    "in_place",
)
# Called outside any jit, the primitive compiles once per distinct params and caches it.
run_ir_p.def_impl(
    jax.jit(lambda *ops, **params: run_ir_p.bind(*ops, **params), static_argnames=_PARAMS)
)
mlir.register_lowering(run_ir_p, _lower)
ad.primitive_jvps[run_ir_p] = _jvp
batching.primitive_batchers[run_ir_p] = _batch
