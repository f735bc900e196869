"""The machinery optgen's own CPU code shares: LLVM modules compiled and registered as XLA
typed-FFI targets, and elements cut into chunks that XLA's intra-op thread pool works on.

- :func:`register` compiles an LLVM module (llvmlite) whose ``handler`` is an
  ``XLA_FFI_Error* (XLA_FFI_CallFrame*)`` function, layouts in :mod:`codegen.ffi_abi`, and
  registers it with ``jax.ffi`` once per process;
- :func:`handler` answers XLA's metadata query; :func:`chunked_handler` runs a table of
  *items* (a group, a parameter, an element range) cut into chunks of about
  :data:`CHUNK_ELEMENTS` elements, handing them to XLA's pool (``XLA_FFI_ThreadPool_Schedule``)
  and working on them too.

Used by the update loop (:mod:`codegen.cpu_kernel`), the reading pass
(:mod:`codegen.cpu_reduce`) and the bfloat16 GEMM (:mod:`codegen.gemm_kernel`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import re

import jax
import llvmlite.binding as llvm
from llvmlite import ir
from optgen.codegen import ffi_abi as abi
from optgen.codegen.llvm_backend import LLVM_TYPES, TRUNCSFBF2, define_truncsfbf2

# a chunk's elements: enough to hide the cost of taking it, small enough to share
CHUNK_ELEMENTS = 1 << 15

# LLVM's cost model picks 4 lanes for loops that convert bf16, which ran 1.5x slower than 8
# (docs/fusion.md).
VECTOR_WIDTH = 8

REASSOC = "reassoc"  # names the adds that may be reassociated

_SELF = "optgen.loop"  # marks the loop's metadata node, made self-referential as LLVM requires

I8, I32, I64, PTR, VOID = (
    ir.IntType(8),
    ir.IntType(32),
    ir.IntType(64),
    ir.PointerType(),
    ir.VoidType(),
)

# target name -> its handler, alive for the process (its engine lives in _ENGINES)
_REGISTERED: dict[str, object] = {}


def kernel_name(prefix: str, specialized_on: tuple) -> str:
    """A target name unique to what a kernel is specialized on (its IR, dtypes, sizes, ...)."""
    return prefix + hashlib.sha256(repr(specialized_on).encode()).hexdigest()[:24]


def new_module(name: str) -> ir.Module:
    """An empty LLVM module for this process's CPU."""
    module = ir.Module(name=name)
    module.triple = llvm.get_process_triple()
    return module


def register(name: str, build) -> str:
    """Register ``build()``'s LLVM module, whose ``handler`` is an XLA FFI handler, as the CPU
    target ``name`` (once per process; later calls only return the name)."""
    if name not in _REGISTERED:
        engine = _compile(build())
        address = engine.get_function_address("handler")
        handler = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(address)
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform="cpu")
        _REGISTERED[name] = handler
    return name


@functools.cache
def _target_machine():
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    llvm.load_library_permanently(ctypes.util.find_library("m"))  # powf, tanhf, fmodf
    cpu, features = llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()
    machine = llvm.Target.from_triple(llvm.get_process_triple()).create_target_machine(
        cpu=cpu, features=features, opt=3, codemodel="jitdefault"
    )
    _define_missing_truncsfbf2(machine)
    return machine


# Every execution engine made, alive for the process: llvmlite frees an engine's target machine
# with it, and all of them share one (a freed engine left the next compile a dangling machine).
_ENGINES: list = []


def _define_missing_truncsfbf2(machine) -> None:
    """Give compiler-rt's ``__truncsfbf2`` a definition (:func:`llvm_backend.define_truncsfbf2`)
    where this process lacks one, before any kernel can call it."""
    if llvm.address_of_symbol(TRUNCSFBF2):
        return
    module = new_module("optgen_truncsfbf2")
    define_truncsfbf2(module)
    engine = llvm.create_mcjit_compiler(llvm.parse_assembly(str(module)), machine)
    engine.finalize_object()
    llvm.add_symbol(TRUNCSFBF2, engine.get_function_address(TRUNCSFBF2))
    _ENGINES.append(engine)


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
    _ENGINES.append(engine)
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


def chunk_bounds(items) -> list[int]:
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


def vectorize(module, branch, lanes: int = VECTOR_WIDTH) -> None:
    """Ask LLVM to vectorize the loop that ``branch`` closes, ``lanes`` wide."""
    width = module.add_metadata(
        [ir.MetaDataString(module, "llvm.loop.vectorize.width"), ir.Constant(I32, lanes)]
    )
    branch.set_metadata("llvm.loop", module.add_metadata([ir.MetaDataString(module, _SELF), width]))


def _field(b: ir.IRBuilder, base, struct, path: str, typ=PTR):
    """Load a field of a C struct (``codegen.ffi_abi``) at ``base``."""
    return b.load(
        b.gep(base, [ir.Constant(I64, abi.offset(struct, path))], source_etype=I8), typ=typ
    )


def buffer_data(b: ir.IRBuilder, buffers, index):
    """The data pointer of XLA_FFI_Buffer ``index`` (a number, or an i64 value) of an args or rets
    array.
    """
    index = ir.Constant(I64, index) if isinstance(index, int) else index
    buffer = b.load(b.gep(buffers, [index], source_etype=PTR), typ=PTR)
    return _field(b, buffer, abi.Buffer, "data")


def _table(module, name: str, element: ir.Type, values: list) -> ir.GlobalVariable:
    array = ir.ArrayType(element, len(values))
    table = ir.GlobalVariable(module, array, name)
    table.global_constant, table.linkage = True, "internal"
    table.initializer = ir.Constant(array, values)
    return table


def run_chunk(module, loops, items, chunks, operands) -> ir.Function:
    """``run_chunk(args, rets, c)``: every item of chunk c, each by its group's loop, with
    ``operands(builder, args, rets, item, leaf, group)`` before its element range."""
    item_type = ir.LiteralStructType([I32, I32, I64, I64])
    table = _table(
        module,
        "items",
        item_type,
        [
            ir.Constant(
                item_type,
                [
                    ir.Constant(I32, g),
                    ir.Constant(I32, p),
                    ir.Constant(I64, s),
                    ir.Constant(I64, e),
                ],
            )
            for g, p, s, e in items
        ],
    )
    bounds = _table(module, "chunks", I64, [ir.Constant(I64, k) for k in chunks])
    fn = ir.Function(module, ir.FunctionType(VOID, [PTR, PTR, I64]), "run_chunk")
    fn.linkage = "internal"
    args, rets, c = fn.args
    entry, head, next_block, done = (
        fn.append_basic_block(name) for name in ("entry", "head", "next", "done")
    )
    b = ir.IRBuilder(entry)
    first = b.load(b.gep(bounds, [ir.Constant(I64, 0), c], source_etype=bounds.value_type), typ=I64)
    last = b.load(
        b.gep(
            bounds,
            [ir.Constant(I64, 0), b.add(c, ir.Constant(I64, 1))],
            source_etype=bounds.value_type,
        ),
        typ=I64,
    )
    b.branch(head)
    b = ir.IRBuilder(head)
    k = b.phi(I64)
    k.add_incoming(first, entry)
    item = b.gep(table, [ir.Constant(I64, 0), k], source_etype=table.value_type)
    fields = [
        b.load(
            b.gep(item, [ir.Constant(I32, 0), ir.Constant(I32, f)], source_etype=item_type), typ=t
        )
        for f, t in enumerate((I32, I32, I64, I64))
    ]
    group, leaf, start, end = fields
    leaf = b.zext(leaf, I64)
    switch = b.switch(group, next_block)
    for g, loop in enumerate(loops):
        block = fn.append_basic_block(f"group{g}")
        switch.add_case(ir.Constant(I32, g), block)
        gb = ir.IRBuilder(block)
        gb.call(loop, operands(gb, args, rets, k, leaf, g) + [start, end])
        gb.branch(next_block)
    b = ir.IRBuilder(next_block)
    following = b.add(k, ir.Constant(I64, 1))
    k.add_incoming(following, next_block)
    b.cbranch(b.icmp_signed("<", following, last), head, done)
    ir.IRBuilder(done).ret_void()
    return fn


def load_scalars(b: ir.IRBuilder, call, args) -> list:
    """The per-step inputs, loaded from their 0-d buffers after the per-parameter ones."""
    first = len(call.tensor_names) * len(call.sizes)
    return [
        b.load(buffer_data(b, args, first + s), typ=LLVM_TYPES[call.step_dtype])
        for s in range(len(call.scalar_names))
    ]


# The work shared by the handler and its tasks, on the heap so that a task the pool starts late
# never reads freed memory: the last of them to let go frees it.
# next chunk, chunks finished, holders, args, rets
_WORK = ir.LiteralStructType([I64, I64, I64, PTR, PTR])

_NEXT, _FINISHED, _HOLDERS, _ARGS, _RETS = range(5)


def _slot(b: ir.IRBuilder, work, index: int):
    return b.gep(work, [ir.Constant(I32, 0), ir.Constant(I32, index)], source_etype=_WORK)


def drain(module, run_chunk, n_chunks: int) -> ir.Function:
    """``drain(work)``: take chunks until none is left, counting each one finished."""
    fn = ir.Function(module, ir.FunctionType(VOID, [PTR]), "drain")
    fn.linkage = "internal"
    (work,) = fn.args
    entry, take, run, done = (
        fn.append_basic_block(name) for name in ("entry", "take", "run", "done")
    )
    b = ir.IRBuilder(entry)
    args, rets = b.load(_slot(b, work, _ARGS), typ=PTR), b.load(_slot(b, work, _RETS), typ=PTR)
    b.branch(take)
    b = ir.IRBuilder(take)
    c = b.atomic_rmw("add", _slot(b, work, _NEXT), ir.Constant(I64, 1), "monotonic")
    b.cbranch(b.icmp_signed("<", c, ir.Constant(I64, n_chunks)), run, done)
    b = ir.IRBuilder(run)
    b.call(run_chunk, [args, rets, c])
    b.atomic_rmw("add", _slot(b, work, _FINISHED), ir.Constant(I64, 1), "release")
    b.branch(take)
    ir.IRBuilder(done).ret_void()
    return fn


def _let_go(b: ir.IRBuilder, work) -> None:
    """Drop one hold on ``work``; the last holder frees it."""
    free = b.module.globals.get("free") or ir.Function(
        b.module, ir.FunctionType(VOID, [PTR]), "free"
    )
    held = b.atomic_rmw("sub", _slot(b, work, _HOLDERS), ir.Constant(I64, 1), "acq_rel")
    with b.if_then(b.icmp_signed("==", held, ir.Constant(I64, 1))):
        b.call(free, [work])


def task(module, drain) -> ir.Function:
    """``task(work)``: what a pool thread runs."""
    fn = ir.Function(module, ir.FunctionType(VOID, [PTR]), "task")
    fn.linkage = "internal"
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    b.call(drain, [fn.args[0]])
    _let_go(b, fn.args[0])
    b.ret_void()
    return fn


def _struct_type(struct) -> ir.LiteralStructType:
    """The LLVM struct laid out as the ctypes ``struct`` (same fields, same C alignment rules)."""
    scalar = {
        ctypes.c_size_t: I64,
        ctypes.c_int64: I64,
        ctypes.c_void_p: PTR,
        ctypes.c_int: I32,
        ctypes.c_uint32: I32,
    }
    return ir.LiteralStructType([scalar.get(t) or _struct_type(t) for _, t in struct._fields_])


def _api_call(b: ir.IRBuilder, api, name: str, struct, values: dict):
    """Call an XLA_FFI_Api function with a stack-allocated argument struct; returns its error (or
    null).
    """
    storage = b.alloca(_struct_type(struct))
    for index, (field, _) in enumerate(struct._fields_):
        value = (
            ir.Constant(I64, ctypes.sizeof(struct))
            if field == "struct_size"
            else values.get(field, ir.Constant(PTR, None))
        )
        b.store(value, b.gep(storage, [ir.Constant(I32, 0), ir.Constant(I32, index)]))
    function = _field(b, api, abi.Api, name, ir.FunctionType(PTR, [PTR]).as_pointer())
    return b.call(function, [storage])


def _forget_error(b: ir.IRBuilder, api, error) -> None:
    with b.if_then(b.icmp_unsigned("!=", error, ir.Constant(PTR, None))):
        _api_call(b, api, "Error_Destroy", abi.ErrorDestroyArgs, {"error": error})


def error_if(b: ir.IRBuilder, frame, failed, message: str):
    """The handler's result for a call that can fail: a new XLA_FFI_Error (``message``, INTERNAL)
    where ``failed`` (an i1) is true, else null (XLA then raises it in the caller)."""
    text = bytearray(message.encode() + b"\0")
    string = ir.GlobalVariable(b.module, ir.ArrayType(I8, len(text)), b.module.get_unique_name())
    string.global_constant, string.linkage = True, "internal"
    string.initializer = ir.Constant(ir.ArrayType(I8, len(text)), text)
    result = b.alloca(PTR)
    b.store(ir.Constant(PTR, None), result)
    with b.if_then(failed):
        api = _field(b, frame, abi.CallFrame, "api")
        values = {"message": string, "errc": ir.Constant(I32, abi.ERROR_INTERNAL)}
        b.store(_api_call(b, api, "Error_Create", abi.ErrorCreateArgs, values), result)
    return b.load(result, typ=PTR)


def handler(module) -> tuple[ir.Function, ir.IRBuilder]:
    """``handler(call_frame)``, the FFI entry point (XLA_FFI_Handler): it answers XLA's metadata
    query (the FFI API version) and returns a builder at the block that runs the call, for the
    caller to fill (its frame is ``fn.args[0]``; it must return null, no error)."""
    fn = ir.Function(module, ir.FunctionType(PTR, [PTR]), "handler")
    frame = fn.args[0]
    entry, check, metadata, run = (
        fn.append_basic_block(name) for name in ("entry", "check", "metadata", "run")
    )
    b = ir.IRBuilder(entry)
    extension = _field(b, frame, abi.CallFrame, "extension_start")
    b.cbranch(b.icmp_unsigned("!=", extension, ir.Constant(PTR, None)), check, run)
    b = ir.IRBuilder(check)
    kind = _field(b, extension, abi.ExtensionBase, "type", I32)
    b.cbranch(b.icmp_signed("==", kind, ir.Constant(I32, abi.METADATA_EXTENSION)), metadata, run)

    b = ir.IRBuilder(metadata)  # XLA asks which FFI API version the handler speaks
    data = _field(b, extension, abi.MetadataExtension, "metadata")
    version = dict(
        struct_size=ctypes.sizeof(abi.ApiVersion),
        extension_start=None,
        major_version=abi.API_VERSION[0],
        minor_version=abi.API_VERSION[1],
    )
    for field, value in version.items():
        ty = I64 if field == "struct_size" else PTR if field == "extension_start" else I32
        where = b.gep(
            data,
            [ir.Constant(I64, abi.offset(abi.Metadata, f"api_version.{field}"))],
            source_etype=I8,
        )
        b.store(ir.Constant(ty, value), where)
    b.store(
        ir.Constant(I32, 0),
        b.gep(data, [ir.Constant(I64, abi.offset(abi.Metadata, "traits"))], source_etype=I8),
    )
    b.ret(ir.Constant(PTR, None))
    return fn, ir.IRBuilder(run)


def call_buffers(b: ir.IRBuilder, frame) -> tuple:
    """The call frame's arrays of argument and result buffers (XLA_FFI_Buffer pointers)."""
    return (
        _field(b, frame, abi.CallFrame, "args.args"),
        _field(b, frame, abi.CallFrame, "rets.args"),
    )


def chunked_handler(module, drain, task, step_outputs, n_chunks: int, finish=None) -> ir.Function:
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
        b.ret(ir.Constant(PTR, None))
        return fn
    api, ctx = _field(b, frame, abi.CallFrame, "api"), _field(b, frame, abi.CallFrame, "ctx")
    malloc = ir.Function(module, ir.FunctionType(PTR, [I64]), "malloc")
    work = b.call(malloc, [ir.Constant(I64, _WORK.get_abi_size(_target_machine().target_data))])
    for index, value in (
        (_NEXT, ir.Constant(I64, 0)),
        (_FINISHED, ir.Constant(I64, 0)),
        (_ARGS, args),
        (_RETS, rets),
    ):
        b.store(value, _slot(b, work, index))
    if n_chunks > 1:
        _schedule(b, api, ctx, task, work, n_chunks)
    else:
        b.store(ir.Constant(I64, 1), _slot(b, work, _HOLDERS))
    b.call(drain, [work])
    _wait(b, work, n_chunks)
    _let_go(b, work)
    if finish is not None:
        b.call(finish, [args, rets])
    b.ret(ir.Constant(PTR, None))
    return fn


def _schedule(b: ir.IRBuilder, api, ctx, task, work, n_chunks: int) -> None:
    """Schedule up to (pool threads - 1) tasks that drain ``work`` beside the calling thread."""
    count = b.alloca(I64)
    b.store(ir.Constant(I64, 1), count)
    error = _api_call(
        b, api, "ThreadPool_NumThreads", abi.NumThreadsArgs, {"ctx": ctx, "num_threads": count}
    )
    _forget_error(b, api, error)
    threads = b.load(count, typ=I64)
    wanted = b.select(
        b.icmp_signed("<", threads, ir.Constant(I64, n_chunks)),
        threads,
        ir.Constant(I64, n_chunks),
    )
    helpers = b.sub(wanted, ir.Constant(I64, 1))
    b.store(b.add(helpers, ir.Constant(I64, 1)), _slot(b, work, _HOLDERS))
    fn = b.function
    head, body, done = (
        fn.append_basic_block(name) for name in ("schedule", "schedule_one", "scheduled")
    )
    before = b.block
    b.branch(head)
    b.position_at_end(head)
    k = b.phi(I64)
    k.add_incoming(ir.Constant(I64, 0), before)
    b.cbranch(b.icmp_signed("<", k, helpers), body, done)
    b.position_at_end(body)
    error = _api_call(
        b, api, "ThreadPool_Schedule", abi.ScheduleArgs, {"ctx": ctx, "task": task, "data": work}
    )
    # no pool: this thread does it all
    with b.if_then(b.icmp_unsigned("!=", error, ir.Constant(PTR, None))):
        _api_call(b, api, "Error_Destroy", abi.ErrorDestroyArgs, {"error": error})
        b.atomic_rmw("sub", _slot(b, work, _HOLDERS), ir.Constant(I64, 1), "acq_rel")
    k.add_incoming(b.add(k, ir.Constant(I64, 1)), b.block)
    b.branch(head)
    b.position_at_end(done)


def _wait(b: ir.IRBuilder, work, n_chunks: int) -> None:
    """Wait until every chunk taken by any thread has finished (the others are done by now)."""
    yield_ = ir.Function(b.module, ir.FunctionType(I32, []), "sched_yield")
    fn = b.function
    head, spin, done = (fn.append_basic_block(name) for name in ("wait", "spin", "waited"))
    b.branch(head)
    b.position_at_end(head)
    finished = b.load_atomic(_slot(b, work, _FINISHED), "acquire", 8, typ=I64)
    b.cbranch(b.icmp_signed("<", finished, ir.Constant(I64, n_chunks)), spin, done)
    b.position_at_end(spin)
    b.call(yield_, [])
    b.branch(head)
    b.position_at_end(done)
