"""What scoring one search candidate costs: the learning-rate grid under one vmapped compile or not.

    flock /tmp/optgen-bench.lock python tools/search_throughput.py \
        [--tasks quadratic,mlp,transformer] [--repeats 3]

For each task, in one process, three ways to train the 7 learning rates x 2 seeds of the
search's grid (``optgen/search/evaluate.py``):

- ``vmapped optgen``: what the search does: one compile of the whole grid; under ``jax.vmap``
  optgen's update takes its batching rule (the IR evaluated as plain jnp ops);
- ``vmapped optax``: the same with ``optax.adamw``: what the batching rule costs against optax;
- ``sequential optgen``: one compile of a single run (the fused update; the learning rate lives
  in the state, so it does not recompile), then the 14 runs one after another.

Each row reports compile and run seconds (medians over repeats, each repeat a fresh compile)
and the ratios against ``vmapped optgen``. Compile options are the search's (``FAST_COMPILE``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
import optax

import optgen  # first: it sets XLA:CPU's fusion option
from optgen.search.evaluate import (
    FAST_COMPILE,
    LEARNING_RATES,
    SEEDS,
    prepare,
    single_run,
    training_run,
)
from optgen.search.tasks import load_task


class _OptaxAdamW:
    """optax.adamw with its learning rate in the state, the way the search sets optgen's."""

    def __init__(self):
        self.opt = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, weight_decay=1e-4)

    def init(self, params):
        return _State(self.opt.init(params))

    def update(self, grads, state, params):
        updates, inner = self.opt.update(grads, state.inner, params)
        return updates, _State(inner)


class _State:
    def __init__(self, inner):
        self.inner = inner

    @property
    def hyperparams(self):
        return dict(self.inner.hyperparams)

    def _replace(self, hyperparams):
        return _State(self.inner._replace(hyperparams={**self.inner.hyperparams, **hyperparams}))


jax.tree_util.register_pytree_node(_State, lambda s: ((s.inner,), None), lambda _, c: _State(c[0]))


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - start


def measure(prepared, repeats: int) -> dict[str, tuple[float, float]]:
    lrs = np.repeat(np.asarray(LEARNING_RATES, np.float32), len(SEEDS))
    keys = np.tile(np.asarray(SEEDS, np.uint32), len(LEARNING_RATES))
    data = (prepared.batches, prepared.held_out)
    times = {"vmapped optgen": [], "vmapped optax": [], "sequential optgen": []}
    for _ in range(repeats):
        for label, opt in (
            ("vmapped optgen", optgen.load("adamw")),
            ("vmapped optax", _OptaxAdamW()),
        ):
            run = training_run(opt, prepared)
            compiled, compile_s = _timed(
                lambda run=run: run.lower(lrs, keys, *data).compile(FAST_COMPILE)
            )
            _, run_s = _timed(lambda compiled=compiled: compiled(lrs, keys, *data))
            times[label].append((compile_s, run_s))
        single = jax.jit(single_run(optgen.load("adamw"), prepared))
        compiled, compile_s = _timed(
            lambda single=single: single.lower(lrs[0], keys[0], *data).compile(FAST_COMPILE)
        )
        _, run_s = _timed(
            lambda compiled=compiled: [
                compiled(lr, key, *data) for lr, key in zip(lrs, keys, strict=True)
            ]
        )
        times["sequential optgen"].append((compile_s, run_s))
    return {
        k: (statistics.median(c for c, _ in v), statistics.median(r for _, r in v))
        for k, v in times.items()
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="quadratic,mlp,transformer")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print("| task | way | compile s | run s | total / vmapped optgen |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.tasks.split(","):
        result = measure(prepare(load_task(name)), args.repeats)
        base = sum(result["vmapped optgen"])
        for label, (compile_s, run_s) in result.items():
            print(
                f"| {name} | {label} | {compile_s:.2f} | {run_s:.3f} | "
                f"{(compile_s + run_s) / base:.2f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
