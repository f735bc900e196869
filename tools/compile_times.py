"""Compile time of one AdamW step against the number of parameter leaves: optgen and optax.

    python tools/compile_times.py                      # 100, 1,000 and 10,000 leaves
    python tools/compile_times.py --leaves 100,1000 --json out.json

Each measurement runs in a fresh process (nothing cached), on leaves shaped like a model's:
per block one matrix and three vectors (weights, bias, two norm scales), cycled to the
count. Times ``lower(...).compile()`` of optgen's ``step`` and of optax's ``adamw`` jitted
and donated the same way, and checks that a second step compiles nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def shapes(count: int) -> list[tuple[int, ...]]:
    block = [(64, 64), (64,), (64,), (64,)]
    return [block[i % len(block)] for i in range(count)]


def measure(kind: str, count: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import optgen  # first: it sets XLA:CPU's fusion option

    device = jax.devices()[0]
    params = {
        f"w{i:05d}": jax.device_put(jnp.full(s, 0.5, jnp.float32), device)
        for i, s in enumerate(shapes(count))
    }
    grads = jax.tree.map(lambda x: x * 0.1, params)
    if kind == "optgen":
        opt = optgen.load("adamw")
        state = opt.init(params)
        step = opt.step
    else:
        opt = optax.adamw(1e-3, weight_decay=1e-4)
        state = opt.init(params)

        def train(p, g, s):
            updates, s = opt.update(g, s, p)
            return optax.apply_updates(p, updates), s

        step = jax.jit(train, donate_argnums=(0, 2))
    start = time.perf_counter()
    step.lower(params, grads, state).compile()
    compile_s = time.perf_counter() - start
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: (
            compiles.append(duration)
            if event == "/jax/core/compile/backend_compile_duration"
            else None
        )
    )
    for _ in range(3):
        params, state = step(params, grads, state)
    jax.block_until_ready(params)
    return {
        "kind": kind,
        "leaves": count,
        "compile_s": compile_s,
        "compiles_in_3_steps": len(compiles),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", default="100,1000,10000")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--one", nargs=2, metavar=("KIND", "LEAVES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]))))
        return 0
    rows = []
    for count in (int(n) for n in args.leaves.split(",")):
        for kind in ("optgen", "optax"):
            out = subprocess.run(
                [sys.executable, __file__, "--one", kind, str(count)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    print(
        "| leaves | optgen compile s | optax compile s | optgen/optax | compiles in the next 3 "
        "steps (optgen, optax) |"
    )
    print("|---|---|---|---|---|")
    for count in sorted({r["leaves"] for r in rows}):
        ours, theirs = (
            next(r for r in rows if r["leaves"] == count and r["kind"] == k)
            for k in ("optgen", "optax")
        )
        print(
            f"| {count:,} | {ours['compile_s']:.1f} | {theirs['compile_s']:.1f} | "
            f"{ours['compile_s'] / theirs['compile_s']:.2f} | {ours['compiles_in_3_steps']}, "
            f"{theirs['compiles_in_3_steps']} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
