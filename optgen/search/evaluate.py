"""Scoring one optimizer on one task: every learning rate of a grid and several seeds under one
compile.

The training loop (``lax.scan`` over the task's fixed batches) is ``jax.vmap``-ed over
(learning rate, seed) pairs: the learning rate goes into the optimizer state's
hyperparameters as a batched value, and the seed draws the initial parameters. Under
``vmap`` optgen's update primitive takes its batching rule (the update as plain jnp ops),
so one candidate costs one compile per task however large the grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optgen.search.tasks import Task, stacked_batches

LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
SEEDS = (0, 1)
# Each candidate is compiled once and run for a few seconds: XLA's backend optimizations
# would double the compile (1.1 s -> 0.5 s for the quadratic, 6.9 s -> 2.9 s for the transformer
# on 2 cores) to save less than they cost.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@dataclass(frozen=True)
class Prepared:
    """A task with its training batches stacked once, shared by every candidate."""

    task: Task
    batches: Any
    held_out: Any


def prepare(task: Task) -> Prepared:
    return Prepared(task, stacked_batches(task), jax.tree.map(jnp.asarray, task.held_out()))


def single_run(opt, prepared: Prepared):
    """``run(learning_rate, seed, batches, held_out) -> held-out loss`` after ``task.steps``
    updates.
    """
    task = prepared.task

    def run(learning_rate, seed, batches, held_out):
        params = task.init(jax.random.key(seed))
        state = opt.init(params)
        state = state._replace(hyperparams={**state.hyperparams, "learning_rate": learning_rate})

        def step(carry, batch):
            params, state = carry
            grads = jax.grad(task.loss)(params, batch)
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, _), _ = jax.lax.scan(step, (params, state), batches)
        return task.loss(params, held_out)

    return run


def training_run(opt, prepared: Prepared):
    """``single_run`` over arrays of (learning rate, seed) pairs, jitted and vmapped."""
    return jax.jit(jax.vmap(single_run(opt, prepared), in_axes=(0, 0, None, None)))


def launch(opt, prepared: Prepared, learning_rates=LEARNING_RATES, seeds=SEEDS, device=None):
    """Start the grid on ``device`` (asynchronously: JAX returns before the device finishes).

    Returns a device array of held-out losses shaped (learning rates, seeds).
    """
    lrs = np.repeat(np.asarray(learning_rates, np.float32), len(seeds))
    keys = np.tile(np.asarray(seeds, np.uint32), len(learning_rates))
    args = (lrs, keys, prepared.batches, prepared.held_out)
    if device is not None:
        args = jax.device_put(args, device)
    compiled = training_run(opt, prepared).lower(*args).compile(FAST_COMPILE)
    return compiled(*args).reshape(len(learning_rates), len(seeds))


def best_loss(losses) -> tuple[float, int]:
    """The lowest mean over seeds of the held-out loss, and its learning rate's index; a
    diverged run (NaN or inf) counts as an infinite loss."""
    losses = np.asarray(losses, np.float64)
    means = np.where(np.isfinite(losses).all(axis=1), losses.mean(axis=1), np.inf)
    best = int(np.argmin(means))
    return float(means[best]), best


def log_ratio(loss: float, baseline: float, cap: float = 2.0) -> float:
    """log(loss / baseline), clipped to [-cap, cap] so no one task dominates a mean; a diverged
    candidate gets ``cap`` (as bad as a loss e² times the baseline's)."""
    if not math.isfinite(loss):
        return cap
    ratio = math.log(max(loss, 1e-30) / max(baseline, 1e-30))
    return min(max(ratio, -cap), cap)
