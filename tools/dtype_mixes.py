"""Every built-in spec over dtype mixes: bytes per element against the minimum, and bandwidth
against a copy timed beside the step (``optgen inspect --run`` for each mix).

Parameters f32, bf16 or f16; per-element states all f32 or all bf16 (and, for the specs of
``--per-state``, each state alone in bf16: optax's ``mu_dtype``). Prints a markdown table
(docs/fusion.md, "Dtype mixes").

    flock /tmp/optgen-bench.lock python tools/dtype_mixes.py --elements 4194304 > mixes.md
"""

from __future__ import annotations

import argparse
import sys
import time

import optgen  # first: it sets XLA:CPU's fusion option before JAX starts a backend
from optgen.kernel_report import inspect, with_state_dtypes
from optgen.library import builtin_names
from optgen.types import DTYPES

MIXES_OF_PARAMS = ("f32", "bf16", "f16")


def state_mixes(program, per_state: bool) -> list[dict[str, str]]:
    """All states f32, all bf16, and with ``per_state`` each state alone in bf16."""
    names = [n for n, e in program.state_extents.items() if e == "tensor"]
    mixes = [{"*": "f32"}, {"*": "bf16"}] if names else [{}]
    if per_state and len(names) > 1:
        mixes += [{"*": "f32", name: "bf16"} for name in names]
    return mixes


def describe(mix: dict[str, str]) -> str:
    if not mix:
        return "-"
    rest = mix.get("*", "")
    alone = [f"{name} {d}" for name, d in mix.items() if name != "*"]
    return ", ".join(alone + ([f"others {rest}" if alone else f"all {rest}"] if rest else []))


def row(spec: str, params: str, mix: dict[str, str], elements: int, repeats: int) -> str:
    program = with_state_dtypes(optgen.load(spec).compiled.program, mix)
    dtype = DTYPES[params]
    try:
        report = inspect(program, dtype, elements, "auto", run=True, repeats=repeats)
    except Exception as err:  # a mix a spec cannot take is a row of the table, not the end of it
        return f"| {spec} | {params} | {describe(mix)} | error | | | | | | {err!s:.60} |"
    step_bw = report.min_bytes_per_element * elements / report.seconds / 1e9
    copy_bw = 8 * elements / report.copy_seconds / 1e9
    excess = report.bytes_per_element / report.min_bytes_per_element
    return (
        f"| {spec} | {params} | {describe(mix)} | {report.lowering} | {report.kernels} "
        f"| {report.bytes_per_element:.2f} | {report.min_bytes_per_element:g} | {excess:.3f} "
        f"| {report.seconds * 1e3:.2f} | {step_bw / copy_bw:.0%} |"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=1 << 22)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--specs", default="", help="comma-separated (default: every built-in)")
    parser.add_argument(
        "--per-state", default="adamw", help="specs that also get each state alone in bf16"
    )
    args = parser.parse_args(argv)
    specs = args.specs.split(",") if args.specs else builtin_names()
    print(
        "| spec | params | states | lowering | loops | bytes/el | minimum | x minimum "
        "| step ms | of copy bandwidth |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    start = time.perf_counter()
    for spec in specs:
        program = optgen.load(spec).compiled.program
        for params in MIXES_OF_PARAMS:
            for mix in state_mixes(program, spec in args.per_state.split(",")):
                print(row(spec, params, mix, args.elements, args.repeats), flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
