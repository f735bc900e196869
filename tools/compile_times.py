"""Compile time of one AdamW step against the number of parameter leaves: optgen and optax.

    python tools/compile_times.py                      # 100, 1,000 and 10,000 leaves
    python tools/compile_times.py --leaves 100,1000 --json out.json --max-gb 12

Each measurement runs in a fresh process (nothing cached), on leaves shaped like a model's:
per block one matrix and three vectors (weights, bias, two norm scales), cycled to the
count. Times what a user waits for: ``init`` and the first ``step`` (compiling included) of
optgen, and the first call of optax's ``adamw`` update jitted and donated the same way (its
``init`` is eager); counts XLA compiles in the first step and in the three after it (which
must be none), and the process's peak memory. A process above ``--max-gb`` stops itself
and is reported as out of memory, so the machine is not starved.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time


def shapes(count: int) -> list[tuple[int, ...]]:
    block = [(64, 64), (64,), (64,), (64,)]
    return [block[i % len(block)] for i in range(count)]


def _guard(max_gb: float, started: float) -> None:
    """Exit with a JSON line once this process's resident memory passes ``max_gb``."""
    page = os.sysconf("SC_PAGE_SIZE")
    while True:
        with open("/proc/self/statm") as f:
            resident = int(f.read().split()[1]) * page / 2**30
        if resident > max_gb:
            print(json.dumps({"out_of_memory_gb": resident, "after_s": time.time() - started}))
            sys.stdout.flush()
            os._exit(3)
        time.sleep(0.2)


def measure(kind: str, count: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import optgen  # first: it sets XLA:CPU's fusion option

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: (
            compiles.append(duration)
            if event == "/jax/core/compile/backend_compile_duration"
            else None
        )
    )
    device = jax.devices()[0]
    params = {
        f"w{i:05d}": jax.device_put(jnp.full(s, 0.5, jnp.float32), device)
        for i, s in enumerate(shapes(count))
    }
    grads = jax.tree.map(lambda x: x * 0.1, params)
    jax.block_until_ready(grads)
    compiles.clear()
    start = time.perf_counter()
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
    jax.block_until_ready(state)
    init_s = time.perf_counter() - start
    in_init = len(compiles)
    start = time.perf_counter()
    params, state = step(params, grads, state)
    jax.block_until_ready(params)
    first_step_s = time.perf_counter() - start
    compiled = len(compiles) - in_init
    for _ in range(3):
        params, state = step(params, grads, state)
    jax.block_until_ready(params)
    return {
        "kind": kind,
        "leaves": count,
        "init_s": init_s,
        "first_step_s": first_step_s,
        "compiles_in_init": in_init,
        "compiles_in_first_step": compiled,
        "compiles_in_3_steps": len(compiles) - compiled - in_init,
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", default="100,1000,10000")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--max-gb", type=float, default=12.0, help="stop a process above this")
    parser.add_argument("--one", nargs=2, metavar=("KIND", "LEAVES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        threading.Thread(target=_guard, args=(args.max_gb, time.time()), daemon=True).start()
        print(json.dumps(measure(args.one[0], int(args.one[1]))))
        return 0
    rows = []
    for count in (int(n) for n in args.leaves.split(",")):
        for kind in ("optgen", "optax"):
            command = [sys.executable, __file__, "--one", kind, str(count)]
            out = subprocess.run(
                [*command, "--max-gb", str(args.max_gb)], capture_output=True, text=True
            ).stdout
            row = {"kind": kind, "leaves": count} | json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            print(row, flush=True)
    print("| leaves | | init s | first step s | compiles (init, first step, next 3) | peak GB |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        cells = (
            f"out of memory: {row['out_of_memory_gb']:.1f} GB after {row['after_s']:.0f} s | | |"
            if "out_of_memory_gb" in row
            else f"{row['init_s']:.2f} | {row['first_step_s']:.2f} | "
            f"{row['compiles_in_init']}, {row['compiles_in_first_step']}, "
            f"{row['compiles_in_3_steps']} | {row['peak_gb']:.2f}"
        )
        print(f"| {row['leaves']:,} | {row['kind']} | {cells} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
