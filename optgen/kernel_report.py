"""What XLA made of a spec: fused kernels, bytes and flops per element, and measured speed.

The minimum traffic a spec implies is one read of every tensor input (``p``, ``g``,
each state) and one write of every output, at their storage dtypes; an AdamW step in
float32 needs 16 bytes read and 12 written per element. XLA's cost analysis of the
compiled executable says how many bytes its kernels actually touch.

A per-tensor reduction (``norm(g)``, ``rms(p)``) must finish before any element that
depends on it is updated, so it costs one more read of each tensor input it reduces
over; the minimum counts that too.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from optgen.codegen import cpu_kernel, export, fusion, quantize
from optgen.ir import Program, dependencies

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
    flops_per_element: float
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
            f"flops per element   {self.flops_per_element:.2f}",
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


def min_bytes_per_element(program: Program, dtype: np.dtype) -> float:
    """One read of each tensor input and one write of each per-element output, at storage
    dtypes, plus one more read of each tensor input a reduction depends on. A q8 state's
    element is its code and its share of a block's float32 scale."""
    dtypes = {"p": np.dtype(dtype), "g": np.dtype(dtype)} | {
        name: _Stored(d) for name, d in export.state_dtypes(program, dtype).items()
    }
    # The kernel updates one flat tensor, which is never factored: its row values are per element,
    # and so are its per-axis statistics (a vector's slices are its elements).
    per_element = ("tensor", "row", "axes")
    reads = sum(
        dtypes[v.name].itemsize for v in program.update.inputs if v.type.extent in per_element
    )
    reads += sum(dtypes[name].itemsize for name in _reduced_inputs(program.update))
    extents = program.extents()
    return reads + sum(
        dtypes[name].itemsize for name, _ in program.update.outputs if extents[name] in per_element
    )


class _Stored:
    """A storage dtype's bytes per element (``itemsize``), q8's scales included."""

    def __init__(self, dtype: np.dtype):
        scale = 4 / quantize.BLOCK if dtype == quantize.Q8 else 0
        self.itemsize = dtype.itemsize + scale


def _reduced_inputs(func) -> set[str]:
    """Names of the per-element inputs that some reduction over a whole flat tensor (``sum``,
    ``col_mean``) depends on."""
    reduced = dependencies(
        func, [op.operands[0] for op in func.ops if op.opcode in ("sum", "col_mean")]
    )
    return {v.name for v in func.inputs if v.type.extent in ("tensor", "row") and id(v) in reduced}


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
    per_element, scalar = count_kernels(compiled.as_text())
    touched = cost["bytes accessed"] + own_loop_bytes(compiled.as_text())
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
            ),
            stochastic=program.rounding == "stochastic",
        ),
        per_element,
        scalar,
        touched / elements,
        min_bytes_per_element(program, dtype),
        cost.get("flops", 0.0) / elements,
    )
    if run:
        report.seconds = _time_step(program, dtype, shape, lowering, repeats)
        report.copy_seconds = _time_copy(elements, repeats)
    return report


def _median_seconds(call, repeats: int) -> float:
    call()  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _time_step(program: Program, dtype: np.dtype, shape: str, lowering: str, repeats: int) -> float:
    """Median time of the step with ``p`` and state donated, as ``Optimizer.step`` runs it."""
    dtypes = export.state_dtypes(program, dtype)
    specs = export.arg_specs(program, dtype, shape, dtypes)
    step = export.kernel(program, dtypes, lowering)
    updated = {name for name, _ in program.update.outputs}
    rng = np.random.default_rng(0)
    inputs = jax.tree.map(
        lambda s: jnp.asarray(
            rng.uniform(0.1, 1.0, s.shape) * (100 if s.dtype == np.int8 else 1), s.dtype
        ),
        specs,
    )
    with export.x64_for(dtype):
        run = jax.jit(lambda donated, kept: step(donated | kept), donate_argnums=0)
        state = [{k: v for k, v in inputs.items() if k in updated}]
        kept = {k: v for k, v in inputs.items() if k not in updated}

        def call():
            state[0] = jax.block_until_ready(run(state[0], kept))

        return _median_seconds(call, repeats)


def _time_copy(elements: int, repeats: int) -> float:
    """Median time to read and write ``elements`` float32 values in place (a donated
    scaled copy).
    """
    buffer = [jnp.ones(elements, jnp.float32)]
    scale = jax.jit(lambda x: x * 0.5, donate_argnums=0)

    def call():
        buffer[0] = jax.block_until_ready(scale(buffer[0]))

    return _median_seconds(call, repeats)
