"""How the update's outputs are lowered so that XLA fuses the whole step into one loop.

An optimizer step writes several outputs (``p`` and each state) that share
intermediates: AdamW's ``p`` reads the new ``mu`` and ``nu``. XLA:GPU fuses such a
producer and its consumer into one multi-output kernel. XLA:CPU does not: it splits
the step into a loop per output and moves ~40 bytes per element instead of 28.
XLA:CPU does merge *sibling* loops (loops that read the same buffers) when its
``xla_cpu_use_multi_output_fusion`` backend option is on, so on CPU optgen lowers each
output from its own copy of the inputs (``per-output``) and turns that option on:
the siblings then merge into one loop that reads every input once and writes every
output once. docs/fusion.md has the measurements.

XLA:CPU merges siblings only when their outputs have one element type: with bf16
parameters and float32 state the loops stay apart, and ``per-output`` would only add
copies, so ``auto`` keeps such steps ``shared``.

``per-output`` also gives XLA about a third more HLO to compile. With thousands of
parameters that made compiling slower than optax's step (1,000 leaves: 17 s against 11;
2,500: 37 s and 3.5 GB against 28 s and 2.5 GB) and at 10,000 leaves it ran out of
memory, so ``auto`` lowers a step over more than :data:`PER_OUTPUT_MAX_LEAVES` arrays
``shared`` (docs/fusion.md, "Compile time").

Lowerings: ``shared`` (outputs share intermediates; right for GPU and for artifacts
compiled elsewhere), ``per-output`` (as above), ``ffi`` (optgen's own CPU loop,
codegen/cpu_kernel.py), ``auto`` (:func:`resolve`: on one CPU device the own loop, except
XLA's ``per-output`` loop for at most :data:`XLA_PREFERRED_MAX_LEAVES` parameters whose
outputs share one dtype where XLA's loop measured as fast (:func:`own_loop_preferred`);
elsewhere XLA's best, ``per-output`` or ``shared``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optgen.diagnostics import InputError
from optgen.ir import Function, dependencies

LOWERINGS = ("auto", "ffi", "shared", "per-output")
PER_OUTPUT_MAX_LEAVES = (
    1000  # above this, per-output's extra HLO costs more compile time than optax's step
)
# Where XLA's per-output loop applies (one dtype per parameter), it ran ~6% faster than optgen's own
# loop on one tensor and on 75 transformer leaves; with 2,000 small leaves the own loop took 0.61x
# the time of XLA's (one call per 64 parameters against a loop each). Between the two: a guess.
XLA_PREFERRED_MAX_LEAVES = 256
_CPU_FLAG = "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion"
_BFLOAT16 = np.dtype(jnp.bfloat16)


def request_cpu_multi_output_fusion() -> None:
    """Turn on XLA:CPU's multi-output fusion through ``XLA_FLAGS``, unless the user opted out.

    XLA reads ``XLA_FLAGS`` once, when JAX first starts a backend, so this only takes
    effect when optgen is imported before any JAX computation has run. Setting
    ``OPTGEN_XLA_FLAGS=0``, or any ``xla_backend_extra_options`` of one's own, leaves
    ``XLA_FLAGS`` untouched.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("OPTGEN_XLA_FLAGS", "1") == "0" or "xla_backend_extra_options" in flags:
        return
    os.environ["XLA_FLAGS"] = f"{flags} {_CPU_FLAG}".strip()


@functools.cache
def cpu_multi_output_fusion() -> bool:
    """Whether XLA:CPU in this process merges sibling loops (checked once, by compiling a probe)."""
    cpu = jax.devices("cpu")[0]
    x = jax.ShapeDtypeStruct((1024,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(cpu))
    with jax.set_mesh(None):  # the probe runs on one device, whatever mesh the caller has set
        hlo = jax.jit(lambda a, b: (a + b, a * b)).lower(x, x).compile().as_text()
    return any(" fusion(" in line and "= (f32[1024]" in line for line in hlo.splitlines())


class Where(NamedTuple):
    """Where a step is lowered: its platforms, whether it runs on one device, whether it is
    exported.
    """

    platforms: tuple[str, ...]
    one_device: bool = True
    for_export: bool = False


def ffi_refusal(where: Where, kernel_refusal: str | None) -> str | None:
    """Why optgen's own CPU loop cannot run here (None when it can); ``kernel_refusal`` is the
    function's own reason (:func:`codegen.cpu_kernel.unsupported`)."""
    if where.platforms != ("cpu",):
        return f"it runs on CPU only, and this step is lowered for {', '.join(where.platforms)}"
    if where.for_export:
        return "an exported step must be portable StableHLO, and the loop lives in this process"
    if not where.one_device:
        return "the step is partitioned over several devices"
    return kernel_refusal


def gemm_here(lowering: str, where: Where, library) -> bool:
    """Whether products of bfloat16-rounded matrices run as MKL's GEMM (codegen/gemm_kernel.py):
    under ``auto``, with MKL loaded, where optgen's own CPU code can run (``shared`` and
    ``per-output`` keep every product XLA's dot: the reference)."""
    return lowering == "auto" and library is not None and ffi_refusal(where, None) is None


def own_loop_preferred(func: Function, out_dtypes: Sequence[Sequence[np.dtype]]) -> bool:
    """Whether the own CPU loop beats XLA's best loops for ``func`` even where XLA makes one loop
    of its per-element outputs (docs/fusion.md, "Reductions"): with sums (XLA reads their inputs
    in a loop per sum, and more: lamb 48 B/element against 44, prodigy 92 against 52; measured
    0.30-0.73x XLA's time), except a single sum of a single input with 32- or 64-bit outputs,
    where XLA's one reduce loop and one update loop are the minimum (novograd's norm(g): the own
    loop took 1.09x; in bf16 XLA splits it, 20 B against 12); and with an output that is an input
    passed through (adan's prev_g = g: XLA copies it apart and splits the step, 68 B against 44;
    0.15x); and with a ``stored`` op (kahan_sum: XLA's one loop computes the update once for
    ``p`` and again for ``kahan_comp``; AdamW on bf16 transformer leaves took 1.40x the step
    without it, the own loop 1.07x); and with a bfloat16 output (XLA:CPU's loop rounds to bf16
    slowly: every built-in with bf16 parameters and state ran at 22-97% of copy bandwidth on the
    Intel machine, 34-85% on the AMD one, where the own loop ran AdamW at 83%, against 41%; docs/
    fusion.md, "Dtype mixes"). ``out_dtypes`` holds each per-element output's dtype per
    parameter."""
    if any(op.opcode == "stored" for op in func.ops):
        return True
    if any(np.dtype(d) == _BFLOAT16 for per_leaf in out_dtypes for d in per_leaf):
        return True
    sums = [op.operands[0] for op in func.ops if op.opcode == "sum"]
    if sums:
        read = dependencies(func, sums)
        inputs = [v for v in func.inputs if v.type.extent == "tensor" and id(v) in read]
        wide = all(np.dtype(d).itemsize >= 4 for per_leaf in out_dtypes for d in per_leaf)
        return not (len(sums) == 1 and len(inputs) == 1 and wide)
    passed_through = {id(v) for v in func.inputs} & {id(v) for _, v in func.outputs}
    return bool(passed_through)


def resolve(
    lowering: str,
    where: Where,
    out_dtypes: Sequence[Sequence[np.dtype]],
    kernel_refusal: str | None = None,
    stochastic: bool = False,
    prefer_own_loop: bool = False,
) -> str:
    """The concrete lowering (``ffi``, ``shared`` or ``per-output``) for ``lowering`` at ``where``.

    ``out_dtypes`` holds each output's storage dtype per parameter; ``stochastic``: bf16 stores
    round stochastically, which XLA:CPU's sibling fusion does not merge into one loop (the
    own loop does: docs/fusion.md, *Stochastic rounding*); ``prefer_own_loop`` says that the own
    loop beats XLA's even where XLA makes one loop (:func:`own_loop_preferred`).
    """
    refusal = ffi_refusal(where, kernel_refusal)
    if lowering == "ffi" and refusal is not None:
        raise InputError(
            f"lowering='ffi' cannot lower this step: {refusal}",
            hint="use lowering='auto', which falls back to XLA's loops where the CPU loop cannot "
            "run",
            code="E384",
        )
    if lowering != "auto":
        return lowering
    xla = xla_lowering(where.platforms, out_dtypes)
    few = max((len(per_output) for per_output in out_dtypes), default=0) <= XLA_PREFERRED_MAX_LEAVES
    if refusal is not None:
        return xla
    return xla if xla == "per-output" and few and not (stochastic or prefer_own_loop) else "ffi"


def xla_lowering(platforms: tuple[str, ...], out_dtypes: Sequence[Sequence[np.dtype]]) -> str:
    """The best of XLA's own lowerings (``shared`` or ``per-output``) for these outputs."""
    one_dtype = all(len(set(per_leaf)) == 1 for per_leaf in zip(*out_dtypes, strict=True))
    few = max((len(per_output) for per_output in out_dtypes), default=0) <= PER_OUTPUT_MAX_LEAVES
    return (
        "per-output"
        if platforms == ("cpu",) and one_dtype and few and cpu_multi_output_fusion()
        else "shared"
    )
