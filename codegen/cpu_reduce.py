"""The reading pass of optgen's own CPU loop: every sum of a step, in one pass over its inputs.

The loop runs the reading stage (:mod:`codegen.reading_pass`) per element and adds up each
of its outputs in float64, over the same items and chunks as the update
(:mod:`codegen.cpu_kernel`), shared by XLA's thread pool. Each item's partial sums land in
a slot of their own (the call's first result, scratch); when every chunk is done, the
calling thread adds each parameter's slots up in item order and stores the sums in the
parameter's compute dtype. The order never depends on which thread ran what, so a step
gives the same sums every run.

Within an item the adds are reassociated so that LLVM spreads them over vector lanes; that
order is fixed by the code, so it too is the same every run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from optgen.codegen import ffi_runtime as rt
from optgen.codegen.cpu_loop import load_elements
from optgen.codegen.evaluate import compute_dtype, evaluate
from optgen.codegen.llvm_backend import F64, LLVM_TYPES, LoopBackend

from optgen.ir import Function, print_function

_I64, _PTR, _VOID = ir.IntType(64), ir.PointerType(), ir.VoidType()
_F64 = np.dtype(np.float64)


@dataclass(frozen=True)
class ReadingCall:
    """One call of the reading pass: the stage, its operands' dtypes and sizes.

    Operands: each name of ``tensor_names`` for every parameter, then the per-step inputs.
    Results: the scratch slots (float64, items x sums), then each sum for every parameter
    (0-d, in the parameter's compute dtype)."""

    func: Function
    tensor_names: tuple[str, ...]
    scalar_names: tuple[str, ...]
    in_dtypes: tuple[tuple[np.dtype, ...], ...]  # per tensor input, per parameter
    param_dtypes: tuple[np.dtype, ...]  # each parameter's storage dtype (sets its compute dtype)
    sizes: tuple[int, ...]
    step_dtype: np.dtype

    @property
    def n_sums(self) -> int:
        return len(self.func.outputs)

    @functools.cached_property
    def plan(self) -> tuple[dict, list]:
        keys = [
            (self.param_dtypes[leaf], tuple(d[leaf] for d in self.in_dtypes))
            for leaf in range(len(self.sizes))
        ]
        return rt.plan_items(self.sizes, keys)

    @functools.cached_property
    def name(self) -> str:
        return rt.kernel_name(
            "optgen_cpu_read_",
            (
                print_function(self.func),
                self.tensor_names,
                self.scalar_names,
                self.in_dtypes,
                self.param_dtypes,
                self.sizes,
                self.step_dtype,
            ),
        )


def target(call: ReadingCall) -> str:
    """The FFI target name of ``call``'s kernel, built and registered on first use."""
    return rt.register(call.name, lambda: _module(call))


def _module(call: ReadingCall) -> ir.Module:
    module = rt.new_module(call.name)
    groups, items = call.plan
    loops = [
        _loop(module, call, p_dtype, in_dtypes, g) for (p_dtype, in_dtypes), g in groups.items()
    ]
    chunks = rt.chunk_bounds(items)
    operands = functools.partial(_operands, call)
    run_chunk = rt.run_chunk(module, loops, items, chunks, operands)
    drain = rt.drain(module, run_chunk, len(chunks) - 1)
    task = rt.task(module, drain)
    rt.chunked_handler(module, drain, task, None, len(chunks) - 1, _combine(module, call, items))
    return module


def _operands(call: ReadingCall, b: ir.IRBuilder, args, rets, item, leaf, group) -> list:
    n = len(call.sizes)
    inputs = [
        rt.buffer_data(b, args, b.add(ir.Constant(_I64, t * n), leaf))
        for t in range(len(call.tensor_names))
    ]
    slots = b.gep(
        rt.buffer_data(b, rets, 0),
        [b.mul(item, ir.Constant(_I64, call.n_sums))],
        source_etype=F64,
    )
    return inputs + [slots] + rt.load_scalars(b, call, args)


def _loop(module, call: ReadingCall, p_dtype, in_dtypes, index: int) -> ir.Function:
    """``read<index>(inputs..., slots, scalars..., start, end)``: the sums over elements
    [start, end) of one parameter, stored in ``slots``."""
    step = LLVM_TYPES[call.step_dtype]
    kinds = [_PTR] * (len(call.tensor_names) + 1) + [step] * len(call.scalar_names) + [_I64, _I64]
    fn = ir.Function(module, ir.FunctionType(_VOID, kinds), f"read{index}")
    fn.linkage = "internal"
    for arg in fn.args[: len(call.tensor_names) + 1]:
        arg.add_attribute("noalias")
    inputs, slots = fn.args[: len(call.tensor_names)], fn.args[len(call.tensor_names)]
    scalars, (start, end) = fn.args[len(inputs) + 1 : -2], fn.args[-2:]

    entry, body_block, done = (fn.append_basic_block(name) for name in ("entry", "loop", "done"))
    hoisted, body = ir.IRBuilder(entry), ir.IRBuilder(body_block)
    i = body.phi(_I64)
    accumulators = [body.phi(F64) for _ in range(call.n_sums)]
    elements, invariants = load_elements(
        call.func, call.tensor_names, inputs, in_dtypes, hoisted, body, i
    )
    if "p" not in elements:  # the evaluator takes its compute dtype from p, which is not read
        elements["p"] = ir.Constant(LLVM_TYPES[p_dtype], 0.0)
    names = [name for name, _ in call.func.outputs]
    values = evaluate(
        call.func,
        LoopBackend(hoisted, body, invariants=list(scalars) + invariants),
        {name: [x] for name, x in elements.items()},
        dict(zip(call.scalar_names, scalars, strict=True)),
        call.step_dtype,
        {name: [_F64] for name in names},
    )
    totals = [
        body.fadd(acc, values[name][0], name=rt.REASSOC)
        for acc, name in zip(accumulators, names, strict=True)
    ]
    following = body.add(i, ir.Constant(_I64, 1))
    back = body.cbranch(body.icmp_signed("<", following, end), body_block, done)
    rt.vectorize(module, back)
    hoisted.cbranch(hoisted.icmp_signed("<", start, end), body_block, done)
    i.add_incoming(start, entry)
    i.add_incoming(following, body_block)
    zero = ir.Constant(F64, 0.0)
    b = ir.IRBuilder(done)
    finals = []
    for acc, total in zip(accumulators, totals, strict=True):
        acc.add_incoming(zero, entry)
        acc.add_incoming(total, body_block)
        finals.append(b.phi(F64))
        finals[-1].add_incoming(zero, entry)
        finals[-1].add_incoming(total, body_block)
    for k, final in enumerate(finals):
        b.store(final, b.gep(slots, [ir.Constant(_I64, k)], source_etype=F64))
    b.ret_void()
    return fn


def _combine(module, call: ReadingCall, items) -> ir.Function:
    """``combine(args, rets)``: each parameter's sums, its items' slots added in item order."""
    fn = ir.Function(module, ir.FunctionType(_VOID, [_PTR, _PTR]), "combine")
    fn.linkage = "internal"
    _, rets = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    slots = rt.buffer_data(b, rets, 0)
    n = len(call.sizes)
    first = {}
    for k, (_, leaf, _, _) in enumerate(items):
        first.setdefault(leaf, [k, k])[1] = k + 1
    for leaf in range(n):
        lo, hi = first.get(leaf, (0, 0))
        target_type = LLVM_TYPES[compute_dtype(call.param_dtypes[leaf])]
        for s in range(call.n_sums):
            total = ir.Constant(F64, 0.0)
            for k in range(lo, hi):  # a parameter has few items: one per CHUNK_ELEMENTS elements
                where = b.gep(slots, [ir.Constant(_I64, k * call.n_sums + s)], source_etype=F64)
                total = b.fadd(total, b.load(where, typ=F64))
            if target_type != F64:
                total = b.fptrunc(total, target_type)
            b.store(total, rt.buffer_data(b, rets, 1 + s * n + leaf))
    b.ret_void()
    return fn
