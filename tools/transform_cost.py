"""What JAX transformations of an optgen update cost, against the fused update and optax.

    python tools/transform_cost.py [--elements 4194304] [--repeats 9]

Under ``jax.vmap`` and ``jax.grad`` the update runs the plain jnp evaluation of its IR
(``codegen/jnp_backend.py``) instead of the fused kernel. This times, jitted, in one
process and interleaved: the plain update, the update under ``vmap`` over a batch of one
model, and ``jax.grad`` of a loss after one update — for optgen's AdamW and optax's.
Lower is better; each figure is the median over repeats.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optgen  # first: it sets XLA:CPU's fusion option


def cases(opt, params, grads):
    state = opt.init(params)

    def update(p, g):
        updates, _ = opt.update(g, state, p)
        return optax.apply_updates(p, updates)

    batched = jax.tree.map(lambda x: x[None], (params, grads))
    return {
        "update": (jax.jit(update), (params, grads)),
        "vmap(update)": (jax.jit(jax.vmap(update)), batched),
        "grad through update": (
            jax.jit(jax.grad(lambda p, g: jnp.sum(update(p, g)["w"] ** 2))),
            (params, grads),
        ),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=args.elements).astype(np.float32))}
    grads = {"w": jnp.asarray(rng.normal(size=args.elements).astype(np.float32))}
    runs = {
        "optgen": cases(optgen.load("adamw"), params, grads),
        "optax": cases(optax.adamw(1e-3, weight_decay=1e-4), params, grads),
    }
    times = {(lib, name): [] for lib in runs for name in runs[lib]}
    for (lib, name), _ in times.items():
        fn, inputs = runs[lib][name]
        jax.block_until_ready(fn(*inputs))  # compile
    for _ in range(args.repeats):
        for (lib, name), samples in times.items():
            fn, inputs = runs[lib][name]
            start = time.perf_counter()
            jax.block_until_ready(fn(*inputs))
            samples.append(1e3 * (time.perf_counter() - start))
    print(f"AdamW on {args.elements:,} f32 elements, median of {args.repeats} (ms)\n")
    print("| call | optgen ms | optax ms | optgen/optax | vs optgen's update |")
    print("|---|---|---|---|---|")
    base = np.median(times[("optgen", "update")])
    for name in runs["optgen"]:
        ours, theirs = np.median(times[("optgen", name)]), np.median(times[("optax", name)])
        print(f"| {name} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f} | {ours / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
