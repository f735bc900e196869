"""The update function as one jitted kernel over a flat tensor: StableHLO, XLA HLO, jax.export.

The kernel takes one dict of the update function's inputs (``p``, ``g``, each state,
then ``t`` and each hyperparameter as scalars) and returns a dict of ``p`` and each
state, so the StableHLO's argument and result locations carry those names.
A shape may be symbolic (``n``), giving a kernel for any length.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
from optgen.codegen import fusion, quantize
from optgen.codegen.primitive import run_ir

from optgen.diagnostics import InputError
from optgen.ir import Program
from optgen.types import STATE_DTYPES, stored_shape


def kernel(
    program: Program,
    state_dtypes: dict[str, np.dtype],
    lowering: str = "shared",
    in_place: bool = False,
):
    """A function of flat arrays that runs ``program.update`` on one tensor.

    ``lowering`` is one of :data:`codegen.fusion.LOWERINGS`; ``in_place`` as in
    :func:`codegen.primitive.run_ir` (a donating caller's outputs stored over its inputs).
    """
    func = program.update

    def step(inputs):
        tensors = {v.name: [inputs[v.name]] for v in func.inputs if v.type.extent != "step"}
        scalars = {v.name: inputs[v.name] for v in func.inputs if v.type.extent == "step"}
        out_dtypes = {"p": [inputs["p"].dtype]} | {
            n: [_stored(d, inputs["p"].shape)] for n, d in state_dtypes.items()
        }
        out = run_ir(
            func,
            tensors,
            scalars,
            out_dtypes,
            lowering=lowering,
            out_extents=program.extents(),
            factoring=program.factoring,
            rounding=program.rounding,
            in_place=in_place,
        )
        return {name: out[name][0] for name, _ in func.outputs}

    return step


def _stored(dtype: np.dtype, shape) -> np.dtype:
    """A state's storage dtype for a parameter of ``shape`` (concrete where a state is q8)."""
    return quantize.storage(dtype, int(np.prod(shape))) if dtype == quantize.Q8 else dtype


def x64_for(dtype: np.dtype):
    """float64 parameters need JAX's x64 mode while tracing; other dtypes leave it alone."""
    return jax.enable_x64(True) if dtype == np.float64 else contextlib.nullcontext()


def arg_specs(program: Program, dtype: np.dtype, shape: str, state_dtypes: dict[str, np.dtype]):
    """ShapeDtypeStructs for the kernel's inputs; ``shape`` is like ``"n"`` or ``"128,256"`` (a
    factored spec needs sizes, not names, for two or more dims: which axes are factored depends on
    them).
    """
    dims = tuple(jax.export.symbolic_shape(shape))
    specs = {
        v.name: jax.ShapeDtypeStruct(
            stored_shape(dims, v.type.extent, program.factoring),
            state_dtypes.get(v.name, scalar_dtype(dtype) if v.type.extent == "step" else dtype),
        )
        for v in program.update.inputs
    }
    return {name: _quantized_spec(name, spec, dims) for name, spec in specs.items()}


def _quantized_spec(name: str, spec: jax.ShapeDtypeStruct, dims):
    """A q8 state's codes and scales (float32 below quantize.MIN_ELEMENTS), else ``spec``."""
    if spec.dtype != quantize.Q8:
        return spec
    if not all(isinstance(d, int) for d in dims):
        raise InputError(
            f"state '{name}' is q8, whose scales' count depends on the parameter's size, "
            f"and the shape {tuple(map(str, dims))} is symbolic",
            hint="give a concrete shape (--shape 4096,1024)",
            code="E401",
        )
    size = int(np.prod(dims))
    if quantize.storage(spec.dtype, size) != quantize.Q8:
        return jax.ShapeDtypeStruct(spec.shape, np.float32)
    scales = jax.ShapeDtypeStruct((quantize.blocks(size),), np.float32)
    return quantize.Quantized(spec, scales)


def scalar_dtype(dtype: np.dtype) -> np.dtype:
    """The step dtype of a kernel for ``dtype`` parameters: float64 for float64, else float32."""
    return np.dtype(np.float64 if dtype == np.float64 else np.float32)


def state_dtypes(
    program: Program, dtype: np.dtype, step_dtype: np.dtype | None = None
) -> dict[str, np.dtype]:
    """Each state's storage dtype: as declared, else ``step_dtype`` for a per-step state (by
    default :func:`scalar_dtype`) and the parameters' ``dtype`` for the others."""
    step_dtype = scalar_dtype(dtype) if step_dtype is None else step_dtype
    return {
        name: STATE_DTYPES[d]
        if d
        else step_dtype
        if program.state_extents[name] == "step"
        else dtype
        for name, d in program.state_dtypes.items()
    }


def lowered_kernel(
    program: Program, dtype: np.dtype, shape: str, lowering: str = "shared"
) -> jax.stages.Lowered:
    """Trace and lower the kernel with JAX (our primitive emits the StableHLO)."""
    dtypes = state_dtypes(program, dtype)
    with x64_for(dtype):
        return jax.jit(kernel(program, dtypes, lowering)).lower(
            arg_specs(program, dtype, shape, dtypes)
        )


def stablehlo_text(program: Program, dtype: np.dtype, shape: str) -> str:
    """The kernel's portable StableHLO module as MLIR text, with spec locations; the module is
    verified.
    """
    module = lowered_kernel(program, dtype, shape).compiler_ir("stablehlo")
    if not module.operation.verify():
        raise RuntimeError("optgen generated a StableHLO module that does not verify")
    return module.operation.get_asm(enable_debug_info=True)


def optimized_hlo(program: Program, dtype: np.dtype, shape: str) -> str:
    """XLA's optimized HLO for this machine's backend, with XLA's best fused loops (needs a concrete
    shape). On CPU a step may run optgen's own loop instead, a call HLO cannot look into:
    ``optgen inspect`` reports which."""
    dtypes = [[np.dtype(dtype)]] + [
        [d]
        for name, d in state_dtypes(program, dtype).items()
        if program.state_extents[name] == "tensor"
    ]
    return (
        lowered_kernel(program, dtype, shape, fusion.xla_lowering((jax.default_backend(),), dtypes))
        .compile()
        .as_text()
    )


def export(
    program: Program, dtype: np.dtype, shape: str, platforms: list[str]
) -> jax.export.Exported:
    """A serializable ``jax.export`` artifact of the kernel for ``platforms``."""
    dtypes = state_dtypes(program, dtype)
    with x64_for(dtype):
        return jax.export.export(jax.jit(kernel(program, dtypes)), platforms=platforms)(
            arg_specs(program, dtype, shape, dtypes)
        )
