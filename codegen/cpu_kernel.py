"""optgen's own CPU loop: one pass over every parameter, whatever their dtypes, called through XLA's
FFI.

XLA:CPU fuses an optimizer step into one loop only when every output has one element type
(``codegen/fusion.py``); with bf16 moments or bf16 parameters the step falls apart into
several loops, and with thousands of small parameters it becomes thousands of loops. This
module generates the loop itself, from the IR, with LLVM (llvmlite):

- for each *group* of parameters with the same dtypes, a function that runs the update
  over a range of elements: the shared evaluator with :class:`LoopBackend` writes its body,
  per-step scalars are computed once before the loop, and LLVM vectorizes the rest;
- a table of *items* (a group, a parameter, an element range) cut into chunks of about
  :data:`CHUNK_ELEMENTS` elements, and a handler that hands the chunks to XLA's own
  intra-op thread pool (``XLA_FFI_ThreadPool_Schedule``) and works on them too;
- the handler is an XLA typed-FFI custom call target (``XLA_FFI_Error* (XLA_FFI_CallFrame*)``,
  layouts in :mod:`codegen.ffi_abi`), registered once per kernel with ``jax.ffi``.

Each output is stored over its input buffer when the step runs in place (output-operand
aliasing), so a donated step reads and writes every byte once. A kernel is specialized to
its shapes and dtypes, like any XLA executable; it lives as long as the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import re
from dataclasses import dataclass

import jax
import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from optgen.codegen import ffi_abi as abi
from optgen.codegen import quantize, reading_pass
from optgen.codegen.evaluate import STRUCTURAL, evaluate
from optgen.codegen.llvm_backend import (
    F32,
    LLVM_TYPES,
    LoopBackend,
    absmax_bits,
    block_reciprocal,
    dequantize_element,
    quantize_element,
)
from optgen.codegen.quantize import Q8

from optgen.ir import Function, print_function

# a chunk's elements: enough to hide the cost of taking it, small enough to share
CHUNK_ELEMENTS = 1 << 15
# LLVM's cost model picks 4 lanes for loops that convert bf16, which ran 1.5x slower than 8
# (docs/fusion.md).
VECTOR_WIDTH = 8
REASSOC = "reassoc"  # names the adds that may be reassociated
_SELF = "optgen.loop"  # marks the loop's metadata node, made self-referential as LLVM requires
_I8, _I32, _I64, _PTR, _VOID = (
    ir.IntType(8),
    ir.IntType(32),
    ir.IntType(64),
    ir.PointerType(),
    ir.VoidType(),
)


def unsupported(func: Function, out_extents: tuple[str, ...]) -> str | None:
    """Why the per-element loop cannot run ``func`` (None when it can). Sums over a parameter
    or over every parameter run as a reading pass before the update (codegen/reading_pass.py)."""
    for op in func.ops:
        if op.opcode in STRUCTURAL and op.opcode not in reading_pass.REDUCTIONS:
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
    out_dtypes: tuple[
        tuple[np.dtype, ...], ...
    ]  # per output, per parameter (one dtype for a step output)
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
        text = repr(
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
            )
        )
        return "optgen_cpu_" + hashlib.sha256(text.encode()).hexdigest()[:24]


_REGISTERED: dict[
    str, tuple
] = {}  # target name -> its execution engine and handler, alive for the process


def target(call: Call) -> str:
    """The FFI target name of ``call``'s kernel, built and registered on first use."""
    return register(call.name, lambda: _module(call))


def register(name: str, build) -> str:
    """Register ``build()``'s LLVM module, whose ``handler`` is an XLA FFI handler, as the CPU
    target ``name`` (once per process; later calls only return the name)."""
    if name not in _REGISTERED:
        engine = _compile(build())
        address = engine.get_function_address("handler")
        handler = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(address)
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform="cpu")
        _REGISTERED[name] = (engine, handler)
    return name


@functools.cache
def _target_machine():
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    llvm.load_library_permanently(ctypes.util.find_library("m"))  # powf, tanhf, fmodf
    cpu, features = llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()
    return llvm.Target.from_triple(llvm.get_process_triple()).create_target_machine(
        cpu=cpu, features=features, opt=3, codemodel="jitdefault"
    )


def _compile(module: ir.Module):
    machine = _target_machine()
    parsed = llvm.parse_assembly(_with_reassociation(_with_loop_ids(str(module))))
    parsed.verify()
    tuning = llvm.create_pipeline_tuning_options(speed_level=3)
    tuning.loop_vectorization = tuning.slp_vectorization = True
    passes = llvm.create_pass_builder(machine, tuning)
    passes.getModulePassManager().run(parsed, passes)
    engine = llvm.create_mcjit_compiler(parsed, machine)
    engine.finalize_object()
    return engine


def _with_loop_ids(text: str) -> str:
    """Make each loop's metadata node distinct and self-referential (llvmlite cannot write one)."""
    return re.sub(
        r'^!(\d+) = !\{ !"' + _SELF + '", ',
        lambda m: f"!{m[1]} = distinct !{{ !{m[1]}, ",
        text,
        flags=re.MULTILINE,
    )


def _with_reassociation(text: str) -> str:
    """Give the adds named ``REASSOC...`` LLVM's ``reassoc`` flag (llvmlite cannot write flags):
    an accumulator's adds may then be split over vector lanes."""
    return re.sub(r'(%"?' + REASSOC + r'[\w.]*"? = fadd) ', r"\1 reassoc ", text)


# ---- the module: loops, items, chunks, and the handler -------------------------------------------


def _module(call: Call) -> ir.Module:
    module = ir.Module(name=call.name)
    module.triple = llvm.get_process_triple()
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
    groups, items = plan_items(call.sizes, keys)
    loops = [
        _loop(module, call, in_dtypes, out_dtypes, g)
        for (in_dtypes, out_dtypes), g in groups.items()
    ]
    chunks = _chunks(items)
    run_chunk = _run_chunk(
        module, loops, items, chunks, functools.partial(_operands, call, list(groups))
    )
    drain = _drain(module, run_chunk, len(chunks) - 1)
    _handler(module, drain, _task(module, drain), _step_outputs(module, call), len(chunks) - 1)
    return module


def plan_items(sizes, keys) -> tuple[dict, list]:
    """Parameters with equal ``keys`` (their dtypes) form a group, run by one loop; returns the
    groups (key -> index) and the items (group, parameter, start, end) of up to CHUNK_ELEMENTS
    elements each, in parameter order."""
    groups: dict[tuple, int] = {}
    items = []
    for leaf, (size, key) in enumerate(zip(sizes, keys, strict=True)):
        group = groups.setdefault(key, len(groups))
        items += [
            (group, leaf, start, min(size, start + CHUNK_ELEMENTS))
            for start in range(0, size, CHUNK_ELEMENTS)
        ]
    return groups, items


def _chunks(items) -> list[int]:
    """Item boundaries of the chunks: consecutive items of about CHUNK_ELEMENTS elements
    together.
    """
    bounds, elements = [0], 0
    for k, (_, _, start, end) in enumerate(items):
        elements += end - start
        if elements >= CHUNK_ELEMENTS:
            bounds.append(k + 1)
            elements = 0
    if bounds[-1] != len(items):
        bounds.append(len(items))
    return bounds


def _loop(module, call: Call, in_dtypes, out_dtypes, index: int) -> ir.Function:
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


def vectorize(module, branch) -> None:
    """Ask LLVM to vectorize the loop that ``branch`` closes, VECTOR_WIDTH lanes wide."""
    width = module.add_metadata(
        [ir.MetaDataString(module, "llvm.loop.vectorize.width"), ir.Constant(_I32, VECTOR_WIDTH)]
    )
    branch.set_metadata("llvm.loop", module.add_metadata([ir.MetaDataString(module, _SELF), width]))


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
            self.module, body.cbranch(body.icmp_signed("<", following, end), body_block, done)
        )
        hoisted.cbranch(hoisted.icmp_signed("<", start, end), body_block, done)
        i.add_incoming(start, entry)
        i.add_incoming(following, body_block)
        ir.IRBuilder(done).ret_void()

    def blocks(self, fn, start, end, scales_in: dict, scales_out: dict) -> None:
        """The loop over blocks of quantize.BLOCK elements (``start`` is a block's first): per
        block, the update of its elements (q8 results kept in a stack buffer, with their absmax),
        then the q8 outputs' scales and codes."""
        names = ("entry", "block", "loop", "encode", "next", "done")
        entry, head, body_block, encode_block, tail, done = map(fn.append_basic_block, names)
        hoisted = ir.IRBuilder(entry)
        kept = {j: hoisted.alloca(F32, size=quantize.BLOCK) for j in scales_out}

        b = ir.IRBuilder(head)
        first = b.phi(_I64)
        following_block = b.add(first, ir.Constant(_I64, quantize.BLOCK))
        last = b.select(b.icmp_signed("<", following_block, end), following_block, end)
        block = b.sdiv(first, ir.Constant(_I64, quantize.BLOCK))
        scales = {
            t: b.load(b.gep(p, [block], source_etype=F32), typ=F32) for t, p in scales_in.items()
        }
        b.branch(body_block)

        body = ir.IRBuilder(body_block)
        i = body.phi(_I64)
        bits = {j: body.phi(_I32) for j in scales_out}
        results = self.update(hoisted, body, i, scales)
        offset = body.sub(i, first)
        grown = {}
        for j in self.call.tensor_outputs:
            if j not in scales_out:
                self.store(body, j, results, i)
                continue
            x = results[self.call.out_names[j]][0]
            body.store(x, body.gep(kept[j], [offset], source_etype=F32))
            grown[j] = absmax_bits(body, bits[j], x)
        following = body.add(i, ir.Constant(_I64, 1))
        vectorize(
            self.module,
            body.cbranch(body.icmp_signed("<", following, last), body_block, encode_block),
        )
        i.add_incoming(first, head)
        i.add_incoming(following, body_block)
        for j in scales_out:
            bits[j].add_incoming(ir.Constant(_I32, 0), head)
            bits[j].add_incoming(grown[j], body_block)

        b = ir.IRBuilder(encode_block)
        reciprocals = {}
        for j, pointer in scales_out.items():
            scale = b.bitcast(grown[j], F32)
            b.store(scale, b.gep(pointer, [block], source_etype=F32))
            reciprocals[j] = block_reciprocal(b, scale)
        self.encode(fn, b, tail, first, last, kept, reciprocals)

        b = ir.IRBuilder(tail)
        b.cbranch(b.icmp_signed("<", last, end), head, done)
        # after the hoisted values
        hoisted.cbranch(hoisted.icmp_signed("<", start, end), head, done)
        first.add_incoming(start, entry)
        first.add_incoming(last, tail)
        ir.IRBuilder(done).ret_void()

    def encode(self, fn, b: ir.IRBuilder, after, first, last, kept: dict, reciprocals: dict):
        """A loop over a block's kept values: each q8 output's codes."""
        loop_block = fn.append_basic_block("encode_loop")
        b.branch(loop_block)
        body = ir.IRBuilder(loop_block)
        i = body.phi(_I64)
        offset = body.sub(i, first)
        for j, buffer in kept.items():
            where = body.gep(buffer, [offset], source_etype=F32)
            code = quantize_element(body, body.load(where, typ=F32), reciprocals[j])
            body.store(code, body.gep(self.outputs[j], [i], source_etype=_I8))
        following = body.add(i, ir.Constant(_I64, 1))
        vectorize(
            self.module, body.cbranch(body.icmp_signed("<", following, last), loop_block, after)
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


def _field(b: ir.IRBuilder, base, struct, path: str, typ=_PTR):
    """Load a field of a C struct (``codegen.ffi_abi``) at ``base``."""
    return b.load(
        b.gep(base, [ir.Constant(_I64, abi.offset(struct, path))], source_etype=_I8), typ=typ
    )


def buffer_data(b: ir.IRBuilder, buffers, index):
    """The data pointer of XLA_FFI_Buffer ``index`` (a number, or an i64 value) of an args or rets
    array.
    """
    index = ir.Constant(_I64, index) if isinstance(index, int) else index
    buffer = b.load(b.gep(buffers, [index], source_etype=_PTR), typ=_PTR)
    return _field(b, buffer, abi.Buffer, "data")


def _table(module, name: str, element: ir.Type, values: list) -> ir.GlobalVariable:
    array = ir.ArrayType(element, len(values))
    table = ir.GlobalVariable(module, array, name)
    table.global_constant, table.linkage = True, "internal"
    table.initializer = ir.Constant(array, values)
    return table


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
    operands += _scalars(b, call, args)
    if call.stochastic:
        operands.append(b.trunc(b.add(leaf, ir.Constant(_I64, call.first_leaf)), _I32))
    return operands


def _run_chunk(module, loops, items, chunks, operands) -> ir.Function:
    """``run_chunk(args, rets, c)``: every item of chunk c, each by its group's loop, with
    ``operands(builder, args, rets, item, leaf, group)`` before its element range."""
    item_type = ir.LiteralStructType([_I32, _I32, _I64, _I64])
    table = _table(
        module,
        "items",
        item_type,
        [
            ir.Constant(
                item_type,
                [
                    ir.Constant(_I32, g),
                    ir.Constant(_I32, p),
                    ir.Constant(_I64, s),
                    ir.Constant(_I64, e),
                ],
            )
            for g, p, s, e in items
        ],
    )
    bounds = _table(module, "chunks", _I64, [ir.Constant(_I64, k) for k in chunks])
    fn = ir.Function(module, ir.FunctionType(_VOID, [_PTR, _PTR, _I64]), "run_chunk")
    fn.linkage = "internal"
    args, rets, c = fn.args
    entry, head, next_block, done = (
        fn.append_basic_block(name) for name in ("entry", "head", "next", "done")
    )
    b = ir.IRBuilder(entry)
    first = b.load(
        b.gep(bounds, [ir.Constant(_I64, 0), c], source_etype=bounds.value_type), typ=_I64
    )
    last = b.load(
        b.gep(
            bounds,
            [ir.Constant(_I64, 0), b.add(c, ir.Constant(_I64, 1))],
            source_etype=bounds.value_type,
        ),
        typ=_I64,
    )
    b.branch(head)
    b = ir.IRBuilder(head)
    k = b.phi(_I64)
    k.add_incoming(first, entry)
    item = b.gep(table, [ir.Constant(_I64, 0), k], source_etype=table.value_type)
    fields = [
        b.load(
            b.gep(item, [ir.Constant(_I32, 0), ir.Constant(_I32, f)], source_etype=item_type), typ=t
        )
        for f, t in enumerate((_I32, _I32, _I64, _I64))
    ]
    group, leaf, start, end = fields
    leaf = b.zext(leaf, _I64)
    switch = b.switch(group, next_block)
    for g, loop in enumerate(loops):
        block = fn.append_basic_block(f"group{g}")
        switch.add_case(ir.Constant(_I32, g), block)
        gb = ir.IRBuilder(block)
        gb.call(loop, operands(gb, args, rets, k, leaf, g) + [start, end])
        gb.branch(next_block)
    b = ir.IRBuilder(next_block)
    following = b.add(k, ir.Constant(_I64, 1))
    k.add_incoming(following, next_block)
    b.cbranch(b.icmp_signed("<", following, last), head, done)
    ir.IRBuilder(done).ret_void()
    return fn


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


def _scalars(b: ir.IRBuilder, call: Call, args) -> list:
    """The per-step inputs, loaded from their 0-d buffers after the per-parameter ones."""
    first = len(call.tensor_names) * len(call.sizes)
    return [
        b.load(buffer_data(b, args, first + s), typ=LLVM_TYPES[call.step_dtype])
        for s in range(len(call.scalar_names))
    ]


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
            dict(zip(call.scalar_names, _scalars(b, call, args), strict=True)),
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


# The work shared by the handler and its tasks, on the heap so that a task the pool starts late
# never reads freed memory: the last of them to let go frees it.
# next chunk, chunks finished, holders, args, rets
_WORK = ir.LiteralStructType([_I64, _I64, _I64, _PTR, _PTR])
_NEXT, _FINISHED, _HOLDERS, _ARGS, _RETS = range(5)


def _slot(b: ir.IRBuilder, work, index: int):
    return b.gep(work, [ir.Constant(_I32, 0), ir.Constant(_I32, index)], source_etype=_WORK)


def _drain(module, run_chunk, n_chunks: int) -> ir.Function:
    """``drain(work)``: take chunks until none is left, counting each one finished."""
    fn = ir.Function(module, ir.FunctionType(_VOID, [_PTR]), "drain")
    fn.linkage = "internal"
    (work,) = fn.args
    entry, take, run, done = (
        fn.append_basic_block(name) for name in ("entry", "take", "run", "done")
    )
    b = ir.IRBuilder(entry)
    args, rets = b.load(_slot(b, work, _ARGS), typ=_PTR), b.load(_slot(b, work, _RETS), typ=_PTR)
    b.branch(take)
    b = ir.IRBuilder(take)
    c = b.atomic_rmw("add", _slot(b, work, _NEXT), ir.Constant(_I64, 1), "monotonic")
    b.cbranch(b.icmp_signed("<", c, ir.Constant(_I64, n_chunks)), run, done)
    b = ir.IRBuilder(run)
    b.call(run_chunk, [args, rets, c])
    b.atomic_rmw("add", _slot(b, work, _FINISHED), ir.Constant(_I64, 1), "release")
    b.branch(take)
    ir.IRBuilder(done).ret_void()
    return fn


def _let_go(b: ir.IRBuilder, work) -> None:
    """Drop one hold on ``work``; the last holder frees it."""
    free = b.module.globals.get("free") or ir.Function(
        b.module, ir.FunctionType(_VOID, [_PTR]), "free"
    )
    held = b.atomic_rmw("sub", _slot(b, work, _HOLDERS), ir.Constant(_I64, 1), "acq_rel")
    with b.if_then(b.icmp_signed("==", held, ir.Constant(_I64, 1))):
        b.call(free, [work])


def _task(module, drain) -> ir.Function:
    """``task(work)``: what a pool thread runs."""
    fn = ir.Function(module, ir.FunctionType(_VOID, [_PTR]), "task")
    fn.linkage = "internal"
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    b.call(drain, [fn.args[0]])
    _let_go(b, fn.args[0])
    b.ret_void()
    return fn


def _struct_type(struct) -> ir.LiteralStructType:
    """The LLVM struct laid out as the ctypes ``struct`` (same fields, same C alignment rules)."""
    scalar = {
        ctypes.c_size_t: _I64,
        ctypes.c_int64: _I64,
        ctypes.c_void_p: _PTR,
        ctypes.c_int: _I32,
        ctypes.c_uint32: _I32,
    }
    return ir.LiteralStructType([scalar.get(t) or _struct_type(t) for _, t in struct._fields_])


def _api_call(b: ir.IRBuilder, api, name: str, struct, values: dict):
    """Call an XLA_FFI_Api function with a stack-allocated argument struct; returns its error (or
    null).
    """
    storage = b.alloca(_struct_type(struct))
    for index, (field, _) in enumerate(struct._fields_):
        value = (
            ir.Constant(_I64, ctypes.sizeof(struct))
            if field == "struct_size"
            else values.get(field, ir.Constant(_PTR, None))
        )
        b.store(value, b.gep(storage, [ir.Constant(_I32, 0), ir.Constant(_I32, index)]))
    function = _field(b, api, abi.Api, name, ir.FunctionType(_PTR, [_PTR]).as_pointer())
    return b.call(function, [storage])


def _forget_error(b: ir.IRBuilder, api, error) -> None:
    with b.if_then(b.icmp_unsigned("!=", error, ir.Constant(_PTR, None))):
        _api_call(b, api, "Error_Destroy", abi.ErrorDestroyArgs, {"error": error})


def handler(module) -> tuple[ir.Function, ir.IRBuilder]:
    """``handler(call_frame)``, the FFI entry point (XLA_FFI_Handler): it answers XLA's metadata
    query (the FFI API version) and returns a builder at the block that runs the call, for the
    caller to fill (its frame is ``fn.args[0]``; it must return null, no error)."""
    fn = ir.Function(module, ir.FunctionType(_PTR, [_PTR]), "handler")
    frame = fn.args[0]
    entry, check, metadata, run = (
        fn.append_basic_block(name) for name in ("entry", "check", "metadata", "run")
    )
    b = ir.IRBuilder(entry)
    extension = _field(b, frame, abi.CallFrame, "extension_start")
    b.cbranch(b.icmp_unsigned("!=", extension, ir.Constant(_PTR, None)), check, run)
    b = ir.IRBuilder(check)
    kind = _field(b, extension, abi.ExtensionBase, "type", _I32)
    b.cbranch(b.icmp_signed("==", kind, ir.Constant(_I32, abi.METADATA_EXTENSION)), metadata, run)

    b = ir.IRBuilder(metadata)  # XLA asks which FFI API version the handler speaks
    data = _field(b, extension, abi.MetadataExtension, "metadata")
    version = dict(
        struct_size=ctypes.sizeof(abi.ApiVersion),
        extension_start=None,
        major_version=abi.API_VERSION[0],
        minor_version=abi.API_VERSION[1],
    )
    for field, value in version.items():
        ty = _I64 if field == "struct_size" else _PTR if field == "extension_start" else _I32
        where = b.gep(
            data,
            [ir.Constant(_I64, abi.offset(abi.Metadata, f"api_version.{field}"))],
            source_etype=_I8,
        )
        b.store(ir.Constant(ty, value), where)
    b.store(
        ir.Constant(_I32, 0),
        b.gep(data, [ir.Constant(_I64, abi.offset(abi.Metadata, "traits"))], source_etype=_I8),
    )
    b.ret(ir.Constant(_PTR, None))
    return fn, ir.IRBuilder(run)


def call_buffers(b: ir.IRBuilder, frame) -> tuple:
    """The call frame's arrays of argument and result buffers (XLA_FFI_Buffer pointers)."""
    return (
        _field(b, frame, abi.CallFrame, "args.args"),
        _field(b, frame, abi.CallFrame, "rets.args"),
    )


def _handler(module, drain, task, step_outputs, n_chunks: int, finish=None) -> ir.Function:
    """``handler(call_frame)``: the FFI entry point (XLA_FFI_Handler). It calls
    ``step_outputs(args, rets)`` (if any), runs the chunks, then ``finish(args, rets)`` (if any)."""
    fn, b = handler(module)
    frame = fn.args[0]
    args, rets = call_buffers(b, frame)
    if step_outputs is not None:
        b.call(step_outputs, [args, rets])
    if n_chunks == 0:
        if finish is not None:
            b.call(finish, [args, rets])
        b.ret(ir.Constant(_PTR, None))
        return fn
    api, ctx = _field(b, frame, abi.CallFrame, "api"), _field(b, frame, abi.CallFrame, "ctx")
    malloc = ir.Function(module, ir.FunctionType(_PTR, [_I64]), "malloc")
    work = b.call(malloc, [ir.Constant(_I64, _WORK.get_abi_size(_target_machine().target_data))])
    for index, value in (
        (_NEXT, ir.Constant(_I64, 0)),
        (_FINISHED, ir.Constant(_I64, 0)),
        (_ARGS, args),
        (_RETS, rets),
    ):
        b.store(value, _slot(b, work, index))
    if n_chunks > 1:
        _schedule(b, api, ctx, task, work, n_chunks)
    else:
        b.store(ir.Constant(_I64, 1), _slot(b, work, _HOLDERS))
    b.call(drain, [work])
    _wait(b, work, n_chunks)
    _let_go(b, work)
    if finish is not None:
        b.call(finish, [args, rets])
    b.ret(ir.Constant(_PTR, None))
    return fn


def _schedule(b: ir.IRBuilder, api, ctx, task, work, n_chunks: int) -> None:
    """Schedule up to (pool threads - 1) tasks that drain ``work`` beside the calling thread."""
    count = b.alloca(_I64)
    b.store(ir.Constant(_I64, 1), count)
    error = _api_call(
        b, api, "ThreadPool_NumThreads", abi.NumThreadsArgs, {"ctx": ctx, "num_threads": count}
    )
    _forget_error(b, api, error)
    threads = b.load(count, typ=_I64)
    wanted = b.select(
        b.icmp_signed("<", threads, ir.Constant(_I64, n_chunks)),
        threads,
        ir.Constant(_I64, n_chunks),
    )
    helpers = b.sub(wanted, ir.Constant(_I64, 1))
    b.store(b.add(helpers, ir.Constant(_I64, 1)), _slot(b, work, _HOLDERS))
    fn = b.function
    head, body, done = (
        fn.append_basic_block(name) for name in ("schedule", "schedule_one", "scheduled")
    )
    before = b.block
    b.branch(head)
    b.position_at_end(head)
    k = b.phi(_I64)
    k.add_incoming(ir.Constant(_I64, 0), before)
    b.cbranch(b.icmp_signed("<", k, helpers), body, done)
    b.position_at_end(body)
    error = _api_call(
        b, api, "ThreadPool_Schedule", abi.ScheduleArgs, {"ctx": ctx, "task": task, "data": work}
    )
    # no pool: this thread does it all
    with b.if_then(b.icmp_unsigned("!=", error, ir.Constant(_PTR, None))):
        _api_call(b, api, "Error_Destroy", abi.ErrorDestroyArgs, {"error": error})
        b.atomic_rmw("sub", _slot(b, work, _HOLDERS), ir.Constant(_I64, 1), "acq_rel")
    k.add_incoming(b.add(k, ir.Constant(_I64, 1)), b.block)
    b.branch(head)
    b.position_at_end(done)


def _wait(b: ir.IRBuilder, work, n_chunks: int) -> None:
    """Wait until every chunk taken by any thread has finished (the others are done by now)."""
    yield_ = ir.Function(b.module, ir.FunctionType(_I32, []), "sched_yield")
    fn = b.function
    head, spin, done = (fn.append_basic_block(name) for name in ("wait", "spin", "waited"))
    b.branch(head)
    b.position_at_end(head)
    finished = b.load_atomic(_slot(b, work, _FINISHED), "acquire", 8, typ=_I64)
    b.cbranch(b.icmp_signed("<", finished, ir.Constant(_I64, n_chunks)), spin, done)
    b.position_at_end(spin)
    b.call(yield_, [])
    b.branch(head)
    b.position_at_end(done)
