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
import jax.numpy as jnp
import numpy as np
from jax._src import sharding_impls
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from optgen.codegen import cpu_kernel, fusion, gemm_kernel, reading_pass, reduction_lowering
from optgen.codegen.evaluate import evaluate
from optgen.codegen.jnp_backend import jnp_backend
from optgen.codegen.quantize import Q8, Quantized, blocks, dequantize, quantize
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
    rounding: str = "nearest",
) -> dict[str, list]:
    """Run ``func`` over every parameter: the JAX counterpart of
    :func:`codegen.interpret.interpret`.

    ``tensors`` maps each tensor and leaf input to one array per parameter, ``scalars``
    each step input to a 0-d array whose dtype is the step dtype. Returns each output's
    arrays, stored in ``out_dtypes``; ``out_extents`` and ``factoring`` as in
    :func:`codegen.evaluate.evaluate`.
    ``lowering`` is one of :data:`codegen.fusion.LOWERINGS`. With ``in_place``, an output named
    like an input may be stored over it (a donated step then writes each buffer where it read it).
    ``rounding`` is ``"nearest"`` or ``"stochastic"`` (bf16 stores, :mod:`codegen.rounding`).

    A q8 state (:mod:`codegen.quantize`) comes as :class:`Quantized` arrays and, where its
    ``out_dtypes`` entry is ``Q8``, leaves as one; the primitive takes and makes its scales
    after everything else, one array per parameter (empty for a parameter kept in float32).
    """
    tensor_names = tuple(v.name for v in func.inputs if v.type.extent != "step")
    scalar_names = tuple(v.name for v in func.inputs if v.type.extent == "step")
    n = len(tensors["p"])
    scaled_in = tuple(
        name for name in tensor_names if any(isinstance(x, Quantized) for x in tensors[name])
    )
    operands = [_codes(x) for name in tensor_names for x in tensors[name]]
    operands += [scalars[s] for s in scalar_names]
    operands += [_scales(x) for name in scaled_in for x in tensors[name]]
    out_names = tuple(name for name, _ in func.outputs)
    extents = tuple((out_extents or {}).get(name, "tensor") for name in out_names)
    flat = run_ir_p.bind(
        *operands,
        func=func,
        n=n,
        tensor_names=tensor_names,
        scalar_names=scalar_names,
        scaled_in=scaled_in,
        out_dtypes=tuple(tuple(np.dtype(d) for d in out_dtypes[name]) for name in out_names),
        delta_output=delta_output,
        lowering=lowering,
        out_extents=extents,
        factoring=factoring,
        in_place=in_place,
        rounding=rounding,
    )
    outputs, start = {}, 0
    for name, extent in zip(out_names, extents, strict=True):
        count = 1 if extent == "step" else n
        outputs[name], start = list(flat[start : start + count]), start + count
    for name in _scaled_out(out_names, [out_dtypes[m] for m in out_names]):
        scales, start = flat[start : start + n], start + n
        outputs[name] = [
            Quantized(x, scale) if np.dtype(d) == Q8 else x
            for x, scale, d in zip(outputs[name], scales, out_dtypes[name], strict=True)
        ]
    return outputs


def _codes(x):
    return x.codes if isinstance(x, Quantized) else x


def _scales(x):
    return x.scales if isinstance(x, Quantized) else jnp.zeros((0,), jnp.float32)


def _scaled_out(out_names, out_dtypes) -> list[str]:
    """The outputs stored as q8 for some parameter: each gets one scales result per parameter."""
    return [name for name, ds in zip(out_names, out_dtypes, strict=True) if Q8 in map(np.dtype, ds)]


def _split(operands, dtypes, n, tensor_names, scalar_names, scaled_in):
    """Operands by input name; a q8 parameter's codes (``dtypes`` says which) with its scales."""
    tensors = {name: list(operands[i * n : (i + 1) * n]) for i, name in enumerate(tensor_names)}
    first = len(tensor_names) * n
    scalars = dict(zip(scalar_names, operands[first : first + len(scalar_names)], strict=True))
    first += len(scalar_names)
    for s, name in enumerate(scaled_in):
        t = tensor_names.index(name)
        tensors[name] = [
            Quantized(x, operands[first + s * n + k]) if dtypes[t * n + k] == Q8 else x
            for k, x in enumerate(tensors[name])
        ]
    return tensors, scalars


@run_ir_p.def_abstract_eval
def _abstract_eval(*operands, func, n, out_dtypes, out_extents, factoring, **_):
    params = operands[:n]
    out = [
        jax.core.ShapedArray(
            () if extent == "step" else stored_shape(p.shape, extent, factoring), dtype
        )
        for dtypes, extent in zip(out_dtypes, out_extents, strict=True)
        for p, dtype in zip(params if extent != "step" else [None], dtypes, strict=True)
    ]
    for name in _scaled_out([name for name, _ in func.outputs], out_dtypes):
        dtypes = out_dtypes[[name for name, _ in func.outputs].index(name)]
        out += [
            jax.core.ShapedArray((blocks(p.size) if d == Q8 else 0,), np.float32)
            for p, d in zip(params, dtypes, strict=True)
        ]
    return out


class _Codec:
    """How a path turns q8 operands into float32 values and back: with jnp, or (``ctx``
    given) by lowering the same jnp functions into the StableHLO being built."""

    def __init__(self, ctx=None):
        self.ctx = ctx

    def dequantize(self, q: Quantized, shape):
        if self.ctx is None:
            return dequantize(q)
        avals = [jax.core.ShapedArray(shape, Q8), _scales_aval(shape)]
        out = [jax.core.ShapedArray(shape, np.float32)]
        fn = mlir.lower_fun(lambda c, s: [dequantize(Quantized(c, s))], multiple_results=True)
        return fn(self.ctx.replace(avals_in=avals, avals_out=out), q.codes, q.scales)[0]

    def quantize(self, x, shape) -> Quantized:
        if self.ctx is None:
            return quantize(x)
        avals = [jax.core.ShapedArray(shape, np.float32)]
        out = [jax.core.ShapedArray(shape, Q8), _scales_aval(shape)]
        # The barrier keeps XLA from constant-folding the quantization of a constant (an init
        # `state mu: q8 = 0` of 16M elements folded for over a minute).
        fn = mlir.lower_fun(
            lambda v: list(quantize(jax.lax.optimization_barrier(v))), multiple_results=True
        )
        codes, scales = fn(self.ctx.replace(avals_in=avals, avals_out=out), x)
        return Quantized(codes, scales)


def _scales_aval(shape):
    return jax.core.ShapedArray((blocks(int(np.prod(shape))),), np.float32)


def _evaluate(
    backend,
    codec: _Codec,
    step_dtype,
    operands,
    dtypes,
    shapes,
    func,
    n,
    tensor_names,
    scalar_names,
    scaled_in,
    out_dtypes,
    delta_output,
    out_extents,
    factoring,
    rounding,
    per_output=False,
) -> list:
    """The primitive's results: the evaluator over ``backend``, q8 states through ``codec``
    (``dtypes`` and ``shapes``: the operands' and the parameters')."""
    tensors, scalars = _split(operands, dtypes, n, tensor_names, scalar_names, scaled_in)
    tensors = {
        name: [
            codec.dequantize(x, shapes[k]) if isinstance(x, Quantized) else x
            for k, x in enumerate(xs)
        ]
        for name, xs in tensors.items()
    }
    names = [name for name, _ in func.outputs]
    f32 = np.dtype(np.float32)
    computed = tuple(tuple(f32 if d == Q8 else d for d in ds) for ds in out_dtypes)
    outputs = evaluate(
        func,
        backend,
        tensors,
        scalars,
        step_dtype,
        dict(zip(names, computed, strict=True)),
        delta_output,
        per_output=per_output,
        out_extents=dict(zip(names, out_extents, strict=True)),
        factoring=factoring,
        rounding=rounding,
    )
    scales = []
    for name in _scaled_out(names, out_dtypes):
        stored = [
            codec.quantize(x, shapes[k]) if d == Q8 else x
            for k, (x, d) in enumerate(
                zip(outputs[name], out_dtypes[names.index(name)], strict=True)
            )
        ]
        outputs[name] = [_codes(x) for x in stored]
        scales += [x.scales if isinstance(x, Quantized) else _no_scales(backend) for x in stored]
    return [x for name in names for x in outputs[name]] + scales


def _no_scales(backend):
    """The scales of a parameter kept in float32: an empty array."""
    if isinstance(backend, StableHLOBackend):
        return mlir.ir_constant(np.zeros((0,), np.float32))
    return jnp.zeros((0,), jnp.float32)


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
    refusal = _refusal(ctx, params)
    choice = fusion.resolve(
        lowering,
        where,
        loop_dtypes,
        refusal,
        stochastic=params["rounding"] == "stochastic",
        prefer_own_loop=fusion.own_loop_preferred(params["func"], loop_dtypes),
    )
    if choice == "ffi" and reading_pass.has_reductions(params["func"]):
        return reduction_lowering.lower(
            ctx, operands, step_dtype, in_place, _lower_ffi, max_leaves=FFI_MAX_LEAVES, **params
        )
    if choice == "ffi":
        return _lower_ffi(ctx, operands, step_dtype, in_place, **params)
    dtypes = [np.dtype(aval.dtype) for aval in ctx.avals_in]
    shapes = [aval.shape for aval in ctx.avals_in[: params["n"]]]
    here = fusion.gemm_here(lowering, where, gemm_kernel.library())
    gemm = gemm_kernel.emitter(ctx) if here else None
    backend = StableHLOBackend(
        gemm,
        gemm_kernel.folding_emitter(ctx) if here else None,
        gemm_kernel.rounding_emitter(ctx) if here else None,
    )
    per_output = choice == "per-output"
    codec = _Codec(ctx)
    return _evaluate(
        backend, codec, step_dtype, operands, dtypes, shapes, per_output=per_output, **params
    )


def _refusal(ctx, params) -> str | None:
    """Why optgen's own CPU loop cannot run this step, or None."""
    if any(not isinstance(d, int) for aval in ctx.avals_in for d in aval.shape):
        return "a shape is symbolic"
    quantized = params["scaled_in"] or _scaled_out(
        [name for name, _ in params["func"].outputs], params["out_dtypes"]
    )
    return cpu_kernel.unsupported(params["func"], params["out_extents"], bool(quantized))


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
    scaled_in,
    out_dtypes,
    delta_output,
    out_extents,
    rounding,
    **_,
):
    """The step as calls of optgen's own CPU loop (codegen/cpu_kernel.py), one per
    :data:`FFI_MAX_LEAVES` parameters; the first also writes the per-step outputs."""
    # each output's first
    starts = np.cumsum([0] + [n if extent == "tensor" else 1 for extent in out_extents])[:-1]
    out_names = tuple(name for name, _ in func.outputs)
    scaled_out = tuple(_scaled_out(out_names, out_dtypes))
    first_scale = len(tensor_names) * n + len(scalar_names)
    results = [None] * len(ctx.avals_out)
    for first in range(0, n, FFI_MAX_LEAVES):
        leaves = range(first, min(n, first + FFI_MAX_LEAVES))
        ins = [t * n + leaf for t in range(len(tensor_names)) for leaf in leaves]
        ins += range(len(tensor_names) * n, first_scale)
        ins += [first_scale + s * n + leaf for s in range(len(scaled_in)) for leaf in leaves]
        outs = _part_outputs(starts, out_extents, leaves, first == 0)
        outs += [
            int(starts[-1]) + (n if out_extents[-1] == "tensor" else 1) + s * n + leaf
            for s in range(len(scaled_out))
            for leaf in leaves
        ]
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
            out_names=out_names,
            out_extents=out_extents,
            out_dtypes=tuple(
                tuple(dtypes[leaf] for leaf in leaves) if extent == "tensor" else dtypes
                for dtypes, extent in zip(out_dtypes, out_extents, strict=True)
            ),
            step_dtype=step_dtype,
            delta_output=delta_output,
            in_place=in_place,
            step_outputs=first == 0,
            rounding=rounding,
            # the hash numbers parameters across calls; else calls of one shape share a kernel
            first_leaf=first if rounding == "stochastic" else 0,
            scaled_in=scaled_in,
            scaled_out=scaled_out,
        )
        aliases = {
            t * len(leaves) + k: call.ret_offsets[j] + k
            for j, t in call.aliases.items()
            for k in range(len(leaves))
        }
        scales_in = len(tensor_names) * len(leaves) + len(scalar_names)
        aliases |= {
            scales_in + s_in * len(leaves) + k: call.scale_results + s * len(leaves) + k
            for s, s_in in call.scale_aliases.items()
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
    """The primitive's meaning in jnp ops (what its transformation rules differentiate
    and batch).
    """
    step_dtype = _step_dtype(operands, params["n"], params["tensor_names"], params["scalar_names"])
    dtypes = [np.dtype(x.dtype) for x in operands]
    shapes = [x.shape for x in operands[: params["n"]]]
    return _evaluate(jnp_backend(), _Codec(), step_dtype, operands, dtypes, shapes, **params)


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
    "scaled_in",
    "out_dtypes",
    "delta_output",
    "lowering",
    "out_extents",
    "factoring",
    "in_place",
    "rounding",
)
# Called outside any jit, the primitive compiles once per distinct params and caches it.
run_ir_p.def_impl(
    jax.jit(lambda *ops, **params: run_ir_p.bind(*ops, **params), static_argnames=_PARAMS)
)
mlir.register_lowering(run_ir_p, _lower)
ad.primitive_jvps[run_ir_p] = _jvp
batching.primitive_batchers[run_ir_p] = _batch
