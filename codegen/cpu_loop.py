"""The body of optgen's own CPU loop: for one group of parameters with the same dtypes, a
function ``loop<index>(...)`` that runs the update over a range of a parameter's elements.

The shared evaluator with :class:`LoopBackend` writes the body; per-step scalars (and
per-parameter inputs) are computed once before the loop, and LLVM vectorizes the rest. With a
q8 state the loop runs block by block: the update of a block's elements and their absmax, in
the same loop as the codes of the block before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np
from llvmlite import ir
from optgen.codegen import quantize
from optgen.codegen.evaluate import evaluate
from optgen.codegen.ffi_runtime import I8 as _I8
from optgen.codegen.ffi_runtime import I32 as _I32
from optgen.codegen.ffi_runtime import I64 as _I64
from optgen.codegen.ffi_runtime import PTR as _PTR
from optgen.codegen.ffi_runtime import VECTOR_WIDTH, vectorize
from optgen.codegen.ffi_runtime import VOID as _VOID
from optgen.codegen.llvm_backend import (
    F32,
    LLVM_TYPES,
    LoopBackend,
    absmax_bits,
    block_reciprocal,
    dequantize_element,
    quantize_element,
    rounds_bfloat16_in_8_lanes,
)
from optgen.codegen.quantize import Q8

# The q8 block loops' vector width: 16 lanes, not the 8 of the other loops: the 16M-element
# adamw8bit step, bound by its square roots (two per q8 state), took 0.85-0.93x the time at 8.
Q8_LANES = 16
# The same width for a loop that rounds to bfloat16 on the bits in 8-lane registers (AVX2): two
# registers' rounded halves then pack with one instruction. Over arrays in L3, AdamW with bf16
# parameters took 0.90x the time of 8 lanes, with bf16 state too 0.97x, with kahan_sum 0.81x.
BF16_BITS_LANES = 16

if TYPE_CHECKING:  # for annotations only: cpu_kernel imports this module
    from optgen.codegen.cpu_kernel import Call


def loop_function(module, call: Call, in_dtypes, out_dtypes, index: int) -> ir.Function:
    """``loop<index>(inputs..., stored outputs..., scales in..., scales out..., scalars...,
    [leaf,] start, end)``: the update over elements [start, end) of one parameter of this group's
    dtypes (``leaf``, its number among the step's parameters, only with stochastic rounding)."""
    stored = [j for j in call.tensor_outputs if j not in call.aliases]
    q8_in = [t for t, d in enumerate(in_dtypes) if d == Q8]
    q8_out = [j for j in call.tensor_outputs if out_dtypes[j] == Q8]
    step = LLVM_TYPES[call.step_dtype]
    pointers = len(call.tensor_names) + len(stored) + len(q8_in) + len(q8_out)
    kinds = (
        [_PTR] * pointers
        + [step] * len(call.scalar_names)
        + [_I32] * call.stochastic
        + [_I64, _I64]
    )
    fn = ir.Function(module, ir.FunctionType(_VOID, kinds), f"loop{index}")
    fn.linkage = "internal"
    for arg in fn.args[: len(call.tensor_names) + len(stored)]:
        # distinct buffers; an output stored in place reuses its input's pointer
        arg.add_attribute("noalias")
    inputs = fn.args[: len(call.tensor_names)]
    outputs = dict(zip(stored, fn.args[len(inputs) : len(inputs) + len(stored)], strict=True))
    outputs |= {j: inputs[k] for j, k in call.aliases.items()}
    first_scale = len(inputs) + len(stored)
    scales_in = dict(zip(q8_in, fn.args[first_scale : first_scale + len(q8_in)], strict=True))
    scales_out = dict(zip(q8_out, fn.args[first_scale + len(q8_in) : pointers], strict=True))
    scalars = fn.args[pointers : pointers + len(call.scalar_names)]
    leaf_ids = [fn.args[-3]] if call.stochastic else None
    start, end = fn.args[-2:]
    loop = _Loop(module, call, in_dtypes, out_dtypes, inputs, outputs, scalars, leaf_ids)
    if q8_in or q8_out:
        loop.blocks(fn, start, end, scales_in, scales_out)
    else:
        loop.elements(fn, start, end)
    return fn


@dataclass
class _Loop:
    """The loop over one parameter's elements, and (with q8 states) over its blocks."""

    module: ir.Module
    call: Call
    in_dtypes: tuple
    out_dtypes: tuple
    inputs: list
    outputs: dict
    scalars: list
    leaf_ids: list | None  # the parameter's number, for stochastic rounding's hash

    def lanes(self) -> int:
        """The plain loop's vector width: BF16_BITS_LANES where its body rounds to bfloat16 (a
        bf16 output, or the ``bf16`` op) on the bits in 8-lane registers."""
        rounds = any(d == ml_dtypes.bfloat16 for d in self.out_dtypes) or any(
            op.opcode == "bf16" for op in self.call.func.ops
        )
        return BF16_BITS_LANES if rounds and rounds_bfloat16_in_8_lanes() else VECTOR_WIDTH

    def elements(self, fn, start, end) -> None:
        """The plain loop: each element read, updated and stored."""
        entry, body_block, done = (fn.append_basic_block(n) for n in ("entry", "loop", "done"))
        hoisted, body = ir.IRBuilder(entry), ir.IRBuilder(body_block)
        i = body.phi(_I64)
        results = self.update(hoisted, body, i, {})
        for j in self.call.tensor_outputs:
            self.store(body, j, results, i)
        following = body.add(i, ir.Constant(_I64, 1))
        vectorize(
            self.module,
            body.cbranch(body.icmp_signed("<", following, end), body_block, done),
            self.lanes(),
        )
        hoisted.cbranch(hoisted.icmp_signed("<", start, end), body_block, done)
        i.add_incoming(start, entry)
        i.add_incoming(following, body_block)
        ir.IRBuilder(done).ret_void()

    def blocks(self, fn, start, end, scales_in: dict, scales_out: dict) -> None:
        """The loop over blocks of quantize.BLOCK elements (``start`` is a block's first). Per
        block, one loop updates its elements, keeps each q8 result in a stack buffer and
        accumulates its absmax; the same loop encodes the previous block's kept values (each
        slot read before it is overwritten) with that block's scale, so the encoder's square
        roots run beside the update's memory traffic. The first block only updates; the codes
        a short block leaves of the previous one, and the last block's, are encoded after."""
        block_size = ir.Constant(_I64, quantize.BLOCK)
        entry = fn.append_basic_block("entry")
        hoisted = ir.IRBuilder(entry)
        kept = {j: hoisted.alloca(F32, size=quantize.BLOCK) for j in scales_out}

        def open_block(name, first):
            """A new basic block computing the bounds and input scales of the block at
            ``first``: its builder, the block's number, its end (exclusive) and the scales."""
            b = ir.IRBuilder(fn.append_basic_block(name))
            following = b.add(first, block_size)
            last = b.select(b.icmp_signed("<", following, end), following, end)
            block = b.sdiv(first, block_size)
            scales = {
                t: b.load(b.gep(p, [block], source_etype=F32), typ=F32)
                for t, p in scales_in.items()
            }
            return b, block, last, scales

        # the first block: update only
        b, block, last, scales = open_block("first_block", start)
        first_block = b.block
        after, reciprocals = self.block_loop(
            fn, b, hoisted, start, last, scales, kept, block, scales_out
        )
        first_exit = after.block

        # the following blocks: update this one, encode the previous one
        steady = fn.append_basic_block("steady")
        final = fn.append_basic_block("final")
        after.cbranch(after.icmp_signed("<", last, end), steady, final)
        b = ir.IRBuilder(steady)
        first = b.phi(_I64)
        previous = {j: b.phi(F32) for j in scales_out}
        opened, block_s, last_s, scales_s = open_block("steady_block", first)
        b.branch(opened.block)
        tail, new = self.block_loop(
            fn, opened, hoisted, first, last_s, scales_s, kept, block_s, scales_out, previous
        )
        # a short (last) block leaves the previous block's values past its length to encode
        rest = ir.IRBuilder(fn.append_basic_block("rest"))
        earlier = tail.sub(first, block_size)
        self.encode(
            fn, tail, rest.block, earlier, tail.sub(last_s, block_size), first, kept, previous
        )
        rest.cbranch(rest.icmp_signed("<", last_s, end), steady, final)
        first.add_incoming(last, first_exit)
        first.add_incoming(last_s, rest.block)
        for j in scales_out:
            previous[j].add_incoming(reciprocals[j], first_exit)
            previous[j].add_incoming(new[j], rest.block)

        # the last block's codes
        b = ir.IRBuilder(final)
        first_f, last_f = b.phi(_I64), b.phi(_I64)
        for phi, values in ((first_f, (start, first)), (last_f, (last, last_s))):
            phi.add_incoming(values[0], first_exit)
            phi.add_incoming(values[1], rest.block)
        reciprocal_f = {j: b.phi(F32) for j in scales_out}
        for j in scales_out:
            reciprocal_f[j].add_incoming(reciprocals[j], first_exit)
            reciprocal_f[j].add_incoming(new[j], rest.block)
        done = fn.append_basic_block("done")
        self.encode(fn, b, done, first_f, first_f, last_f, kept, reciprocal_f)
        ir.IRBuilder(done).ret_void()
        # after the hoisted values
        hoisted.cbranch(hoisted.icmp_signed("<", start, end), first_block, done)

    def block_loop(
        self, fn, b, hoisted, first, last, scales, kept, block, scales_out, previous=None
    ):
        """The loop over elements [first, last) of one block, from ``b``: the update, each q8
        result kept (its absmax accumulated), and with ``previous`` (each q8 output's reciprocal
        scale of the block before) that block's codes from the slots it overwrites. Then the
        block's scales are stored; returns a builder after the loop and their reciprocals."""
        body_block = fn.append_basic_block("loop")
        b.branch(body_block)
        body = ir.IRBuilder(body_block)
        i = body.phi(_I64)
        bits = {j: body.phi(_I32) for j in kept}
        results = self.update(hoisted, body, i, scales)
        offset = body.sub(i, first)
        grown = {}
        for j in self.call.tensor_outputs:
            if j not in kept:
                self.store(body, j, results, i)
                continue
            x = results[self.call.out_names[j]][0]
            slot = body.gep(kept[j], [offset], source_etype=F32)
            if previous is not None:
                code = quantize_element(body, body.load(slot, typ=F32), previous[j])
                earlier = body.sub(i, ir.Constant(_I64, quantize.BLOCK))
                body.store(code, body.gep(self.outputs[j], [earlier], source_etype=_I8))
            body.store(x, slot)
            grown[j] = absmax_bits(body, bits[j], x)
        following = body.add(i, ir.Constant(_I64, 1))
        after = fn.append_basic_block("scales")
        vectorize(
            self.module,
            body.cbranch(body.icmp_signed("<", following, last), body_block, after),
            Q8_LANES,
        )
        i.add_incoming(first, b.block)
        i.add_incoming(following, body_block)
        for j in kept:
            bits[j].add_incoming(ir.Constant(_I32, 0), b.block)
            bits[j].add_incoming(grown[j], body_block)
        b = ir.IRBuilder(after)
        reciprocals = {}
        for j, pointer in scales_out.items():
            scale = b.bitcast(grown[j], F32)
            b.store(scale, b.gep(pointer, [block], source_etype=F32))
            reciprocals[j] = block_reciprocal(b, scale)
        return b, reciprocals

    def encode(self, fn, b: ir.IRBuilder, after, base, first, last, kept: dict, reciprocals):
        """A loop over elements [first, last) (none when first >= last), from ``b`` to
        ``after``: each q8 output's codes of the values kept at ``i - base``."""
        loop_block = fn.append_basic_block("encode_loop")
        b.cbranch(b.icmp_signed("<", first, last), loop_block, after)
        body = ir.IRBuilder(loop_block)
        i = body.phi(_I64)
        offset = body.sub(i, base)
        for j, buffer in kept.items():
            where = body.gep(buffer, [offset], source_etype=F32)
            code = quantize_element(body, body.load(where, typ=F32), reciprocals[j])
            body.store(code, body.gep(self.outputs[j], [i], source_etype=_I8))
        following = body.add(i, ir.Constant(_I64, 1))
        vectorize(
            self.module,
            body.cbranch(body.icmp_signed("<", following, last), loop_block, after),
            Q8_LANES,
        )
        i.add_incoming(first, b.block)
        i.add_incoming(following, loop_block)

    def update(self, hoisted, body, i, scales: dict) -> dict:
        """The evaluator's results for element ``i`` (q8 inputs decoded by their block's scale)."""
        call = self.call
        elements, invariants = load_elements(
            call.func, call.tensor_names, self.inputs, self.in_dtypes, hoisted, body, i
        )
        for t, name in enumerate(call.tensor_names):
            if self.in_dtypes[t] == Q8:
                elements[name] = dequantize_element(body, elements[name], scales[t])
        invariants += [*self.scalars, *(self.leaf_ids or [])]
        backend = LoopBackend(hoisted, body, invariants=invariants, index=i)
        computed = [np.dtype(np.float32) if d == Q8 else d for d in self.out_dtypes]
        return evaluate(
            call.func,
            backend,
            {name: [x] for name, x in elements.items()},
            dict(zip(call.scalar_names, self.scalars, strict=True)),
            call.step_dtype,
            {name: [dtype] for name, dtype in zip(call.out_names, computed, strict=True)},
            call.delta_output,
            out_extents=dict(zip(call.out_names, call.out_extents, strict=True)),
            rounding=call.rounding,
            leaf_ids=self.leaf_ids,
        )

    def store(self, body, j: int, results: dict, i) -> None:
        ty = LLVM_TYPES[self.out_dtypes[j]]
        body.store(
            results[self.call.out_names[j]][0], body.gep(self.outputs[j], [i], source_etype=ty)
        )


def _stored_type(dtype) -> ir.Type:
    return _I8 if dtype == Q8 else LLVM_TYPES[dtype]


def load_elements(func, names, pointers, dtypes, hoisted, body, i) -> tuple[dict, list]:
    """Element i of each per-element input (loaded in the loop ``body``) and the value of each
    per-parameter input (loaded once, before the loop); returns them by name, and the latter."""
    elements, invariants = {}, []
    for name, ptr, dtype in zip(names, pointers, dtypes, strict=True):
        once = func.input(name).type.extent == "leaf"
        b, index = (hoisted, ir.Constant(_I64, 0)) if once else (body, i)
        ty = _stored_type(dtype)
        elements[name] = b.load(b.gep(ptr, [index], source_etype=ty), typ=ty)
        if once:
            invariants.append(elements[name])
    return elements, invariants
