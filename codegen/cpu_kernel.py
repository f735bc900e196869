"""optgen's own CPU loop: one pass over every parameter, whatever their dtypes, called through
XLA's FFI.

XLA:CPU fuses an optimizer step into one loop only when every output has one element type
(``codegen/fusion.py``); with bf16 moments or bf16 parameters the step falls apart into
several loops, and with thousands of small parameters it becomes thousands of loops. This
module builds the step's kernel from the IR: one loop function per group of parameters with
the same dtypes (:mod:`codegen.cpu_loop`), run over chunks of elements on XLA's thread pool
by an FFI handler (:mod:`codegen.ffi_runtime`), which also computes the per-step outputs.

Each output is stored over its input buffer when the step runs in place (output-operand
aliasing), so a donated step reads and writes every byte once. A kernel is specialized to
its shapes and dtypes, like any XLA executable; it lives as long as the process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from optgen.codegen import ffi_runtime as rt
from optgen.codegen import reading_pass
from optgen.codegen.cpu_loop import loop_function
from optgen.codegen.evaluate import ELEMENTWISE_STRUCTURAL, STRUCTURAL, evaluate
from optgen.codegen.ffi_runtime import I32 as _I32
from optgen.codegen.ffi_runtime import I64 as _I64
from optgen.codegen.ffi_runtime import PTR as _PTR
from optgen.codegen.ffi_runtime import VOID as _VOID
from optgen.codegen.ffi_runtime import buffer_data
from optgen.codegen.llvm_backend import LoopBackend
from optgen.codegen.quantize import Q8

from optgen.ir import Function, print_function


def unsupported(
    func: Function, out_extents: tuple[str, ...], quantized: bool = False
) -> str | None:
    """Why the per-element loop cannot run ``func`` (None when it can); ``quantized``: some state
    is q8. Sums over a parameter or over every parameter run as a reading pass before the update
    (codegen/reading_pass.py)."""
    if quantized and reading_pass.has_reductions(func):
        # the reading pass reads stored values; a q8 state's need its block's scale
        return "a step with sums keeps q8 state"
    for op in func.ops:
        if op.opcode in STRUCTURAL and op.opcode not in (
            reading_pass.REDUCTIONS + ELEMENTWISE_STRUCTURAL
        ):
            return f"it computes '{op.opcode}', which reads more than one element"
    allowed = {"tensor", "leaf", "step"}
    extents = {v.type.extent for v in func.inputs} | {op.result.type.extent for op in func.ops}
    if extents - allowed:
        return f"it has {sorted(extents - allowed)[0]} values"
    if set(out_extents) - allowed:
        return "an output is not one value per element, per parameter or per step"
    if any(v.type.kind == "bool" for v in func.inputs):
        return "an input is a boolean"
    names = [name for name, _ in func.outputs]
    return reading_pass.refusal(func, dict(zip(names, out_extents, strict=True)))


@dataclass(frozen=True)
class Call:
    """What one kernel is specialized on: the function and its operands' dtypes and sizes."""

    func: Function
    tensor_names: tuple[str, ...]
    scalar_names: tuple[str, ...]
    in_dtypes: tuple[tuple[np.dtype, ...], ...]  # per tensor input, per parameter
    sizes: tuple[int, ...]  # each parameter's number of elements
    out_names: tuple[str, ...]
    out_extents: tuple[str, ...]  # "tensor" or "step"
    # per output, per parameter (one dtype for a step output)
    out_dtypes: tuple[tuple[np.dtype, ...], ...]
    step_dtype: np.dtype
    delta_output: str | None
    in_place: bool  # each output named like an input is stored over it
    # Whether this call writes the per-step outputs (of the calls over parts of the parameters,
    # one does).
    step_outputs: bool = True
    rounding: str = "nearest"  # or "stochastic": bf16 stores from codegen/rounding.py's hash
    first_leaf: int = 0  # the number of this call's first parameter among the step's (the hash's)

    @property
    def stochastic(self) -> bool:
        return self.rounding == "stochastic"

    scaled_in: tuple[str, ...] = ()  # q8 inputs: their scales follow the scalars, one per parameter
    scaled_out: tuple[str, ...] = ()  # q8 outputs: their scales follow the other results

    @functools.cached_property
    def scale_results(self) -> int:
        """Where the q8 outputs' scales start among the call's results."""
        return self.ret_offsets[-1] + (
            len(self.sizes) if self.out_extents[-1] == "tensor" else int(self.step_outputs)
        )

    @functools.cached_property
    def scale_aliases(self) -> dict[int, int]:
        """A q8 output's scales (by index in ``scaled_out``) -> the input scales stored over."""
        if not self.in_place:
            return {}
        return {
            s: self.scaled_in.index(name)
            for s, name in enumerate(self.scaled_out)
            if name in self.scaled_in and name != self.delta_output
        }

    @functools.cached_property
    def ret_offsets(self) -> list[int]:
        """Where each output's buffers start among the call's results: n per tensor output, 1 (or 0)
        per step output.
        """
        sizes = [
            len(self.sizes) if e == "tensor" else int(self.step_outputs) for e in self.out_extents
        ]
        return [sum(sizes[:j]) for j in range(len(sizes))]

    @functools.cached_property
    def tensor_outputs(self) -> list[int]:
        return [j for j, extent in enumerate(self.out_extents) if extent == "tensor"]

    @functools.cached_property
    def aliases(self) -> dict[int, int]:
        """Output index -> the tensor input it is stored over."""
        if not self.in_place:
            return {}
        return {
            j: self.tensor_names.index(name)
            for j, name in enumerate(self.out_names)
            if name in self.tensor_names
            and name != self.delta_output
            and self.out_extents[j] == "tensor"
            and self.out_dtypes[j] == self.in_dtypes[self.tensor_names.index(name)]
        }

    @functools.cached_property
    def name(self) -> str:
        return rt.kernel_name(
            "optgen_cpu_",
            (
                print_function(self.func),
                self.tensor_names,
                self.scalar_names,
                self.in_dtypes,
                self.sizes,
                self.out_names,
                self.out_extents,
                self.out_dtypes,
                self.step_dtype,
                self.delta_output,
                self.in_place,
                self.step_outputs,
                self.rounding,
                self.first_leaf,
                self.scaled_in,
                self.scaled_out,
            ),
        )


def target(call: Call) -> str:
    """The FFI target name of ``call``'s kernel, built and registered on first use."""
    return rt.register(call.name, lambda: _module(call))


def _module(call: Call) -> ir.Module:
    module = rt.new_module(call.name)
    keys = [
        (
            tuple(d[leaf] for d in call.in_dtypes),
            tuple(
                d[leaf] if e == "tensor" else d[0]
                for d, e in zip(call.out_dtypes, call.out_extents, strict=True)
            ),
        )
        for leaf in range(len(call.sizes))
    ]
    groups, items = rt.plan_items(call.sizes, keys)
    loops = [
        loop_function(module, call, in_dtypes, out_dtypes, g)
        for (in_dtypes, out_dtypes), g in groups.items()
    ]
    chunks = rt.chunk_bounds(items)
    run_chunk = rt.run_chunk(
        module, loops, items, chunks, functools.partial(_operands, call, list(groups))
    )
    drain = rt.drain(module, run_chunk, len(chunks) - 1)
    rt.chunked_handler(
        module, drain, rt.task(module, drain), _step_outputs(module, call), len(chunks) - 1
    )
    return module


def _operands(call: Call, keys: list, b: ir.IRBuilder, args, rets, item, leaf, group) -> list:
    """A loop's operands for one parameter: its inputs, its outputs not stored in place, its q8
    scales, the per-step inputs and, with stochastic rounding, the parameter's number."""
    in_dtypes, out_dtypes = keys[group]
    n = len(call.sizes)
    operands = [
        buffer_data(b, args, b.add(ir.Constant(_I64, t * n), leaf))
        for t in range(len(call.tensor_names))
    ]
    operands += [
        buffer_data(b, rets, b.add(ir.Constant(_I64, call.ret_offsets[j]), leaf))
        for j in call.tensor_outputs
        if j not in call.aliases
    ]
    operands += _scale_pointers(b, call, args, rets, leaf, in_dtypes, out_dtypes)
    operands += rt.load_scalars(b, call, args)
    if call.stochastic:
        operands.append(b.trunc(b.add(leaf, ir.Constant(_I64, call.first_leaf)), _I32))
    return operands


def _scale_pointers(b: ir.IRBuilder, call: Call, args, rets, leaf, in_dtypes, out_dtypes) -> list:
    """The scales of a group's q8 inputs, then its q8 outputs' (the inputs' when in place)."""
    n = len(call.sizes)
    first = len(call.tensor_names) * n + len(call.scalar_names)

    def scales_in(s):
        return buffer_data(b, args, b.add(ir.Constant(_I64, first + s * n), leaf))

    pointers = [
        scales_in(call.scaled_in.index(name))
        for name, d in zip(call.tensor_names, in_dtypes, strict=True)
        if d == Q8
    ]
    for j in call.tensor_outputs:
        if out_dtypes[j] != Q8:
            continue
        s = call.scaled_out.index(call.out_names[j])
        if s in call.scale_aliases:
            pointers.append(scales_in(call.scale_aliases[s]))
        else:
            where = b.add(ir.Constant(_I64, call.scale_results + s * n), leaf)
            pointers.append(buffer_data(b, rets, where))
    return pointers


def _step_outputs(module, call: Call) -> ir.Function:
    """``step_outputs(args, rets)``: compute and store the per-step outputs (once per call)."""
    fn = ir.Function(module, ir.FunctionType(_VOID, [_PTR, _PTR]), "step_outputs")
    fn.linkage = "internal"
    args, rets = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    names = [
        name
        for name, extent in zip(call.out_names, call.out_extents, strict=True)
        if extent == "step"
    ]
    if call.step_outputs and names:
        results = evaluate(
            call.func,
            LoopBackend(b, b),
            {name: [] for name in call.tensor_names},
            dict(zip(call.scalar_names, rt.load_scalars(b, call, args), strict=True)),
            call.step_dtype,
            {
                name: [dtype[0]] if extent == "step" else []
                for name, extent, dtype in zip(
                    call.out_names, call.out_extents, call.out_dtypes, strict=True
                )
            },
            out_extents=dict(zip(call.out_names, call.out_extents, strict=True)),
        )
        for name in names:
            j = call.out_names.index(name)
            b.store(results[name][0], buffer_data(b, rets, call.ret_offsets[j]))
    b.ret_void()
    return fn
