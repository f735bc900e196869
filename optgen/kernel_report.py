"""What XLA made of a spec: fused kernels, bytes and flops per element, and measured speed.

The minimum traffic a spec implies is one read of every tensor input (``p``, ``g``,
each state) and one write of every output, at their storage dtypes; an AdamW step in
float32 needs 16 bytes read and 12 written per element. XLA's cost analysis of the
compiled executable says how many bytes its kernels actually touch.

A per-tensor or global reduction (``norm(g)``, ``global_norm(g)``) must finish before any
element that depends on it is updated: the step needs a reading pass, which reads each
input the reductions are computed from, before the update pass (optgen's own CPU loop runs
exactly that, ``codegen/reading_pass.py``). The minimum counts both passes, and only the
branch the inspected parameter takes where the spec chooses by shape (``if ndim == 2:``).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np

from optgen.codegen import cpu_kernel, export, fusion, quantize
from optgen.codegen.evaluate import needed_by
from optgen.diagnostics import InputError
from optgen.ir import Program

# a fused loop (a lone one may be ROOT), or a call of optgen's own CPU loop
_FUSION = re.compile(
    r"^\s+(?:ROOT )?%\S+ = (?P<type>\(.*?\)|\S+) "
    r'(?:fusion\(|custom-call\(.*custom_call_target="optgen_cpu_)'
)
_SHAPE = re.compile(r"\[(\d+(?:,\d+)*)\]")


@dataclass
class Report:
    """One compiled step's figures; ``seconds`` and ``copy_seconds`` only with ``run``."""

    elements: int
    lowering: str
    kernels: int  # fused loops over the parameter's elements
    scalar_kernels: int  # fused loops over per-step scalars
    bytes_per_element: float
    min_bytes_per_element: float
    flops_per_element: float | None  # None: the elements run in optgen's own loop
    seconds: float | None = None
    copy_seconds: float | None = None

    def lines(self) -> list[str]:
        excess = self.bytes_per_element / self.min_bytes_per_element - 1
        out = [
            f"elements            {self.elements:,}",
            f"lowering            {self.lowering}",
            f"fused kernels       {self.kernels} per-element, {self.scalar_kernels} scalar",
            f"bytes per element   {self.bytes_per_element:.2f} (spec minimum "
            f"{self.min_bytes_per_element:g}, {excess:+.1%})",
            "flops per element   "
            + (
                "- (optgen's own loop: XLA's cost analysis does not see into it)"
                if self.flops_per_element is None
                else f"{self.flops_per_element:.2f}"
            ),
        ]
        if self.seconds is not None:
            step_bw = self.min_bytes_per_element * self.elements / self.seconds / 1e9
            copy_bw = 8 * self.elements / self.copy_seconds / 1e9
            out += [
                f"step time           {self.seconds * 1e3:.3f} ms ({step_bw:.1f} GB/s of the spec "
                "minimum)",
                f"copy bandwidth      {copy_bw:.1f} GB/s (f32 read + write); step at "
                f"{step_bw / copy_bw:.0%}",
            ]
        return out


def min_bytes_per_element(program: Program, dtype: np.dtype, shape=(2,)) -> float:
    """The bytes per element a step must move at storage dtypes, in the pass structure it needs:
    the update pass reads each per-element input its per-element outputs need and writes each
    per-element output; where it has sums, a reading pass before it reads each per-element input
    they need. Only the branch a parameter of ``shape`` takes counts (``if ndim == 2:``). A q8
    state's element is its code and its share of a block's float32 scale."""
    func = program.update
    dtypes = {"p": np.dtype(dtype), "g": np.dtype(dtype)} | {
        name: _Stored(d) for name, d in export.state_dtypes(program, dtype).items()
    }
    dtypes |= dict.fromkeys(program.extra_inputs, np.dtype(dtype))  # Sophia's Hessian, as g
    extents = program.extents()
    # The kernel updates one flat tensor, which is never factored: its row values are per element,
    # and so are its per-axis statistics (a vector's slices are its elements).
    per_element = ("tensor", "row", "axes")
    written = [v for name, v in func.outputs if extents[name] in per_element]
    needed = needed_by(func, shape, [v for _, v in func.outputs])
    sums = [op.operands[0] for op in func.ops if op.opcode in _SUMS and id(op.result) in needed]
    update = needed_by(func, shape, written, stop=_GIVEN)
    reading = needed_by(func, shape, sums, stop=_GIVEN) if sums else set()
    inputs = [v for v in func.inputs if v.type.extent in per_element]
    reads = sum(dtypes[v.name].itemsize for v in inputs if id(v) in update)
    reads += sum(dtypes[v.name].itemsize for v in inputs if id(v) in reading)
    return reads + sum(
        dtypes[name].itemsize for name, _ in func.outputs if extents[name] in per_element
    )


class _Stored:
    """A storage dtype's bytes per element (``itemsize``), q8's scales included."""

    def __init__(self, dtype: np.dtype):
        scale = 4 / quantize.BLOCK if dtype == quantize.Q8 else 0
        self.itemsize = dtype.itemsize + scale


# Sums over a whole flat tensor (each needs a reading pass first), and the ops whose results the
# update pass is given rather than computes per element (sizes and dimensions read no element).
_SUMS = ("sum", "col_mean")
_GIVEN = _SUMS + ("gsum", "size", "dim")


def count_kernels(hlo_text: str) -> tuple[int, int]:
    """(per-element, scalar) fusions in the entry computation of optimized HLO text."""
    entry = hlo_text[hlo_text.index("\nENTRY") :]
    per_element = scalar = 0
    for line in entry.splitlines():
        match = _FUSION.match(line)
        if match:
            if _SHAPE.search(match["type"]):
                per_element += 1
            else:
                scalar += 1
    return per_element, scalar


_ARRAY = re.compile(r"\b(pred|s8|bf16|f16|f32|f64|s32)\[([\d,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "bf16": 2, "f16": 2, "f32": 4, "f64": 8, "s32": 4}


def own_loop_bytes(hlo_text: str) -> int:
    """Bytes that calls of optgen's own CPU loop touch, which XLA's cost analysis does not see: the
    loop reads each operand and writes each result once, so their sizes are its traffic."""
    total = 0
    for line in hlo_text.splitlines():
        if 'custom_call_target="optgen_cpu_' in line:
            results = line.split(" custom-call(")[0]
            operands = line.split("operand_layout_constraints={")[1].split("}, api_version")[0]
            arrays = _ARRAY.findall(results) + _ARRAY.findall(operands)
            total += sum(
                _ITEMSIZE[kind] * int(np.prod([int(d) for d in dims.split(",") if d]))
                for kind, dims in arrays
            )
    return total


def with_state_dtypes(program: Program, dtypes: dict[str, str]) -> Program:
    """``program`` with per-element states stored in other dtypes: ``dtypes`` maps a state's name,
    or ``*`` for every per-element state, to a dtype's spec name (``bf16``)."""
    per_element = [n for n, e in program.state_extents.items() if e in ("tensor", "row", "axes")]
    chosen = {name: dtypes["*"] for name in per_element if "*" in dtypes}
    chosen |= {name: d for name, d in dtypes.items() if name != "*"}
    unknown = set(chosen) - set(per_element)
    if unknown:
        raise InputError(
            f"no per-element state named '{sorted(unknown)[0]}' "
            f"(its states: {', '.join(per_element)})",
            hint="name a state of the spec, or * for every per-element state",
            code="E410",
        )
    return replace(program, state_dtypes=program.state_dtypes | chosen)


def inspect(
    program: Program,
    dtype: np.dtype,
    elements: int,
    lowering: str = "auto",
    run: bool = False,
    repeats: int = 20,
) -> Report:
    """Compile ``program``'s step for ``elements`` parameters of ``dtype`` and report on it."""
    shape = str(elements)
    compiled = export.lowered_kernel(program, dtype, shape, lowering).compile()
    cost = compiled.cost_analysis()
    text = compiled.as_text()
    per_element, scalar = count_kernels(text)
    loop_bytes = own_loop_bytes(text)
    touched = cost["bytes accessed"] + loop_bytes
    out_dtypes = [[dtype]] + [
        [d]
        for name, d in export.state_dtypes(program, dtype).items()
        if program.state_extents[name] == "tensor"
    ]
    where = fusion.Where((jax.default_backend(),))
    report = Report(
        elements,
        fusion.resolve(
            lowering,
            where,
            out_dtypes,
            cpu_kernel.unsupported(
                program.update,
                tuple(program.extents().get(name, "tensor") for name, _ in program.update.outputs),
                quantize.Q8 in export.state_dtypes(program, dtype).values(),
            ),
            stochastic=program.rounding == "stochastic",
            prefer_own_loop=fusion.own_loop_preferred(program.update, out_dtypes),
        ),
        per_element,
        scalar,
        touched / elements,
        min_bytes_per_element(program, dtype, (elements,)),
        None if loop_bytes else cost.get("flops", 0.0) / elements,
    )
    if run:
        report.seconds, report.copy_seconds = _time_step_and_copy(
            program, dtype, shape, lowering, repeats
        )
    return report


def _time_step_and_copy(
    program: Program, dtype: np.dtype, shape: str, lowering: str, repeats: int
) -> tuple[float, float]:
    """Median times of the step (``p`` and state donated, as ``Optimizer.step`` runs it) and of a
    donated in-place scaled copy of as many float32 values, timed in turn, so that both see the
    machine in the same state."""
    dtypes = export.state_dtypes(program, dtype)
    specs = export.arg_specs(program, dtype, shape, dtypes)
    step = export.kernel(program, dtypes, lowering, in_place=True)  # as Optimizer.step: donated
    updated = {name for name, _ in program.update.outputs}
    rng = np.random.default_rng(0)
    with export.x64_for(dtype):
        inputs = jax.tree.map(
            lambda s: jnp.asarray(
                rng.uniform(0.1, 1.0, s.shape) * (100 if s.dtype == np.int8 else 1), s.dtype
            ),
            specs,
        )
        run = jax.jit(lambda donated, kept: step(donated | kept), donate_argnums=0)
        state = [{k: v for k, v in inputs.items() if k in updated}]
        kept = {k: v for k, v in inputs.items() if k not in updated}
        buffer = [jnp.ones(int(np.prod(specs["p"].shape)), jnp.float32)]
        scale = jax.jit(lambda x: x * 0.5, donate_argnums=0)

        def call_step():
            state[0] = jax.block_until_ready(run(state[0], kept))

        def call_copy():
            buffer[0] = jax.block_until_ready(scale(buffer[0]))

        times = {call_step: [], call_copy: []}
        for call in times:
            call()  # compile and warm up
        for _ in range(repeats):
            for call, seconds in times.items():
                start = time.perf_counter()
                call()
                seconds.append(time.perf_counter() - start)
        return float(np.median(times[call_step])), float(np.median(times[call_copy]))
