"""Specs with reductions: optgen's own CPU loop (a reading pass, then the update) against XLA's
loops, interleaved in one process, on one 16M-element f32 tensor and on the transformer leaves
of tools/bench.py. What ``lowering="auto"`` takes for such specs rests on these figures
(docs/fusion.md, "Reductions").

    flock /tmp/optgen-bench.lock python tools/bench_reductions.py --repeats 7 --block 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import optgen  # noqa: I001  (before any JAX computation: it sets XLA:CPU's fusion option)

sys.path.insert(0, str(Path(__file__).parent))
from bench import transformer_shapes  # noqa: E402

SPECS = {
    "lamb": ("lamb", {}),
    "lars": ("lars", {}),
    "novograd": ("novograd", {}),
    "cautious_adamw": ("cautious_adamw", {}),
    "prodigy": ("prodigy", {}),
    "adan": ("adan", {}),
    "adamw+clip+skip": ("adamw", {"global_clipnorm": 1.0, "skip_nonfinite": True}),
}
WORKLOADS = {"single": [(16 * 1024 * 1024,)], "transformer": transformer_shapes()}
LOWERINGS = ("ffi", "per-output")  # per-output: XLA's best one-dtype lowering, what auto took


def tree(shapes, seed):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in shapes]


def bench(spec, options, shapes, repeats, block) -> dict[str, float]:
    """Median ms per step of each lowering, and the median of the paired per-repeat ratios."""
    runners = {}
    for lowering in LOWERINGS:
        opt = optgen.load(spec, lowering=lowering, **options)
        params, grads = tree(shapes, 0), tree(shapes, 1)
        runners[lowering] = [opt, params, opt.init(params), grads]
    for r in runners.values():  # compile and warm up
        r[1], r[2] = r[0].step(r[1], r[3], r[2])
    times = {lowering: [] for lowering in LOWERINGS}
    for _ in range(repeats):
        for lowering, r in runners.items():
            start = time.perf_counter()
            for _ in range(block):
                r[1], r[2] = r[0].step(r[1], r[3], r[2])
            jax.block_until_ready(r[1])
            times[lowering].append(1e3 * (time.perf_counter() - start) / block)
    ratio = np.median(np.asarray(times["ffi"]) / np.asarray(times["per-output"]))
    return {lowering: float(np.median(t)) for lowering, t in times.items()} | {"ratio": ratio}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--block", type=int, default=3)
    parser.add_argument("--specs", default=",".join(SPECS))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    args = parser.parse_args(argv)
    print("| spec | workload | own loop ms | XLA ms | own / XLA |")
    print("|---|---|---|---|---|")
    for key in args.specs.split(","):
        spec, options = SPECS[key]
        for workload in args.workloads.split(","):
            r = bench(spec, options, WORKLOADS[workload], args.repeats, args.block)
            print(
                f"| {key} | {workload} | {r['ffi']:.2f} | {r['per-output']:.2f} "
                f"| {r['ratio']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
