"""Shampoo's step against its Newton iteration count: the first step (trace, compile, run) and later
ones.

    flock /tmp/optgen-bench.lock python tools/bench_shampoo.py

One (512, 2048) and one (512, 512) matrix and a 512-vector, f32; the table in docs/fusion.md.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

import optgen


def measure(root_steps: int, repeats: int = 3) -> tuple[float, float]:
    opt = optgen.load("shampoo", root_steps=root_steps)
    params = {"a": jnp.ones((512, 2048)), "b": jnp.ones((512, 512)), "c": jnp.ones(512)}
    grads = jax.tree.map(lambda x: 0.01 * x, params)
    state = opt.init(params)
    start = time.perf_counter()
    params, state = jax.block_until_ready(opt.step(params, grads, state))
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        params, state = opt.step(params, grads, state)
    jax.block_until_ready(params)
    return first, 1e3 * (time.perf_counter() - start) / repeats


if __name__ == "__main__":
    print("| root_steps | first step, s | each later step, ms |\n|---:|---:|---:|")
    for steps in (10, 25):
        first, later = measure(steps)
        print(f"| {steps} | {first:.1f} | {later:.0f} |")
