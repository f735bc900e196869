"""Newton-Schulz unrolled (as ``repeat N:`` lowers it) against a rolled loop (``lax.fori_loop``).

    python tools/bench_loops.py   # 5 f32 steps on 512 x 2048 and 16000 x 512 (Gram: 512 x 512)

Prints, for each shape and form, the compile time and the median run time of the jitted
orthogonalization, with XLA:CPU (the two forms give the same numbers). optgen unrolls.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import optgen  # noqa: F401  (before any JAX computation, as in tools/bench.py)

A, B, C = 3.4445, -4.775, 2.0315


def iteration(_, x):
    a = x @ x.T
    return A * x + (B * a + C * a @ a) @ x


def orthogonalize(x, steps, unroll):
    x = x / (jnp.linalg.norm(x) + 1e-8)
    return jax.lax.fori_loop(0, steps, iteration, x, unroll=unroll)


def measure(shape, steps=5, repeats=5):
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
    if shape[0] > shape[1]:
        x = x.T  # the smaller Gram matrix, as optax and optgen's muon choose
    rows = []
    for unroll in (True, False):
        fn = jax.jit(lambda y, unroll=unroll: orthogonalize(y, steps, unroll))
        start = time.perf_counter()
        compiled = fn.lower(x).compile()
        compile_s = time.perf_counter() - start
        compiled(x).block_until_ready()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            compiled(x).block_until_ready()
            times.append(time.perf_counter() - start)
        rows.append(
            (shape, "unrolled" if unroll else "fori_loop", compile_s, float(np.median(times)))
        )
    return rows


def main() -> int:
    print("| shape | form | compile s | run ms |\n| --- | --- | --- | --- |")
    for shape in ((512, 2048), (16000, 512)):
        for shape_, form, compile_s, run_s in measure(shape):
            print(f"| {shape_[0]} x {shape_[1]} | {form} | {compile_s:.3f} | {1e3 * run_s:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
