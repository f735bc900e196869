"""The tasks a search scores optimizers on: four built-ins and the user-task protocol.

A task is a Python module (or object) with

- ``init(key) -> params``: the initial parameters, a pytree of float arrays;
- ``loss(params, batch) -> scalar``: the loss to minimize;
- ``batches(seed) -> iterator``: training batches (pytrees of arrays); the search takes the
  first ``steps`` of them, the same batches for every candidate;
- ``held_out() -> batch``: data never trained on; a candidate's score is the loss on it
  after ``steps`` updates;
- ``steps`` (optional, default 200): the fixed step budget.

The built-ins generate their data from a seed (no downloads): ``quadratic`` (an
ill-conditioned quadratic with noisy gradients), ``logistic`` (logistic regression),
``mlp`` (a small MLP classifier on a random teacher's labels) and ``transformer`` (a
one-layer causal transformer predicting the next token of a random Markov chain). ``variant=1``
draws a new problem of the same kind (new data, new teacher): the held-out tasks that
``optgen search`` validates its winners on.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optgen.diagnostics import SpecError, did_you_mean

BUILTIN = ("quadratic", "logistic", "mlp", "transformer")
_PROTOCOL = ("init", "loss", "batches", "held_out")


@dataclass(frozen=True)
class Task:
    """A task as the protocol states it, with the name it is reported under."""

    name: str
    init: Callable[[jax.Array], Any]
    loss: Callable[[Any, Any], jax.Array]
    batches: Callable[[int], Iterator[Any]]
    held_out: Callable[[], Any]
    steps: int = 200


def load_task(name: str, variant: int = 0) -> Task:
    """A built-in task by name, or a user task from a ``.py`` file or an importable module."""
    if name in BUILTIN:
        return _BUILDERS[name](variant)
    if name.endswith(".py") or os.sep in name:
        if not os.path.isfile(name):
            raise SpecError(
                f"no built-in task or task file named '{name}'",
                hint=f"the built-in tasks are {', '.join(BUILTIN)}",
                code="E018",
            )
        spec = importlib.util.spec_from_file_location(f"optgen_task_{abs(hash(name))}", name)
        module = importlib.util.module_from_spec(spec)
        loader = lambda: spec.loader.exec_module(module)  # noqa: E731
    elif _importable(name):
        module, loader = None, lambda: None
    else:
        raise SpecError(
            f"no built-in task, task file or module named '{name}'",
            hint=did_you_mean(name, BUILTIN)
            or f"the built-in tasks are {', '.join(BUILTIN)}; "
            "a user task is a .py file or a module with init, loss, batches and held_out",
            code="E018",
        )
    try:
        loader()
        module = module or importlib.import_module(name)
    except Exception as err:  # the user's code: any failure is theirs to see, with its message
        raise SpecError(
            f"the task '{name}' failed to import: {type(err).__name__}: {err}",
            hint="run the file with python to see the full traceback",
            code="E396",
        ) from None
    missing = [attr for attr in _PROTOCOL if not callable(getattr(module, attr, None))]
    if missing:
        raise SpecError(
            f"the task '{name}' has no {', '.join(missing)}",
            hint="a task defines init(key), loss(params, batch), batches(seed) and held_out() "
            "(docs/search.md, 'Your own task')",
            code="E395",
        )
    steps = getattr(module, "steps", 200)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise SpecError(
            f"the task '{name}' sets steps = {steps!r}; it takes a positive whole number",
            hint="steps is how many updates each candidate gets, e.g. steps = 200",
            code="E397",
        )
    return Task(name, module.init, module.loss, module.batches, module.held_out, steps)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def stacked_batches(task: Task, seed: int = 0) -> Any:
    """The first ``task.steps`` training batches, stacked along a new leading axis (what a scan
    reads).
    """
    batches = list(itertools.islice(task.batches(seed), task.steps))
    if len(batches) < task.steps:
        raise SpecError(
            f"the task '{task.name}' gave {len(batches)} batches; it needs {task.steps}",
            hint="batches(seed) yields at least `steps` batches (an endless generator is simplest)",
            code="E398",
        )
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *batches)


# ---- the built-in tasks -----------------------------------------------------------------------


def _endless(draw: Callable[[np.random.Generator], Any], seed: int) -> Iterator[Any]:
    rng = np.random.default_rng(seed)
    while True:
        yield draw(rng)


def _quadratic(variant: int) -> Task:
    """0.5 (x - x*)ᵀ A (x - x*) in 32 dims, A's eigenvalues from 1 to 1000; batches add gradient
    noise.
    """
    rng = np.random.default_rng(100 + variant)
    basis, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    a = jnp.asarray((basis * np.logspace(0, 3, 32)) @ basis.T, jnp.float32)
    optimum = jnp.asarray(rng.normal(scale=0.1, size=32), jnp.float32)

    def loss(params, noise):
        d = params["x"] - optimum
        return 0.5 * d @ a @ d + noise @ params["x"]

    return Task(
        "quadratic",
        lambda key: {"x": 0.03 * jax.random.normal(key, (32,))},
        loss,
        lambda seed: _endless(
            lambda r: r.normal(scale=0.1, size=32).astype(np.float32), seed + 10 * variant
        ),
        lambda: jnp.zeros(32, jnp.float32),
        steps=100,
    )


def _classification(variant: int, name: str, hidden: int) -> Task:
    """Labels of a random teacher (linear, or a tanh MLP) on Gaussian inputs, with 10% flipped."""
    rng = np.random.default_rng(200 + variant + 7 * hidden)
    dims, classes = 16, (2 if hidden == 0 else 4)
    teacher_in = rng.normal(size=(dims, max(hidden, classes)))
    teacher_out = rng.normal(size=(max(hidden, classes), classes))

    def label(x, r):
        y = np.argmax(np.tanh(x @ teacher_in) @ teacher_out if hidden else x @ teacher_in, axis=-1)
        flip = r.random(len(y)) < 0.1
        return np.where(flip, r.integers(0, classes, len(y)), y).astype(np.int32)

    def batch(r, size=64):
        x = r.normal(size=(size, dims)).astype(np.float32)
        return x, label(x, r)

    def init(key):
        if hidden == 0:
            return {"w": jnp.zeros((dims, classes)), "b": jnp.zeros(classes)}
        k1, k2 = jax.random.split(key)
        return {
            "w1": jax.random.normal(k1, (dims, hidden)) / np.sqrt(dims),
            "b1": jnp.zeros(hidden),
            "w2": jax.random.normal(k2, (hidden, classes)) / np.sqrt(hidden),
            "b2": jnp.zeros(classes),
        }

    def loss(params, data):
        x, y = data
        logits = (
            x @ params["w"] + params["b"]
            if hidden == 0
            else jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]
        )
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1))

    held = batch(np.random.default_rng(300 + variant + 7 * hidden), 1024)
    return Task(
        name,
        init,
        loss,
        lambda seed: _endless(batch, 1000 * variant + seed),
        lambda: held,
        steps=200,
    )


def _transformer(variant: int) -> Task:
    """Next-token prediction on sequences of a random Markov chain (16 tokens, length 8) with a
    one-layer causal transformer; held out: 512 fresh sequences of the same chain."""
    vocab, length, width = 16, 8, 32
    rng = np.random.default_rng(400 + variant)
    transitions = rng.dirichlet(np.full(vocab, 0.3), size=vocab)

    def sequences(r, count):
        rows = [r.integers(0, vocab, count)]
        for _ in range(length - 1):
            u = r.random(count)[:, None]
            rows.append(
                (u > np.cumsum(transitions[rows[-1]], axis=1)).sum(axis=1).clip(0, vocab - 1)
            )
        return np.stack(rows, axis=1).astype(np.int32)

    def init(key):
        k = jax.random.split(key, 6)
        scale = 1 / np.sqrt(width)
        return {
            "embed": jax.random.normal(k[0], (vocab, width)) * scale,
            "pos": jax.random.normal(k[1], (length - 1, width)) * scale,
            "qkv": jax.random.normal(k[2], (3, width, width)) * scale,
            "mlp_in": jax.random.normal(k[3], (width, 2 * width)) * scale,
            "mlp_out": jax.random.normal(k[4], (2 * width, width)) * scale / 2,
            "unembed": jax.random.normal(k[5], (width, vocab)) * scale,
        }

    def loss(params, tokens):
        x, y = tokens[:, :-1], tokens[:, 1:]
        h = params["embed"][x] + params["pos"]
        q, k, v = (h @ params["qkv"][i] for i in range(3))
        causal = jnp.tril(jnp.ones((length - 1, length - 1), bool))
        scores = jnp.where(causal, q @ jnp.swapaxes(k, 1, 2) / np.sqrt(width), -1e9)
        h = h + jax.nn.softmax(scores, axis=-1) @ v
        h = h + jax.nn.relu(h @ params["mlp_in"]) @ params["mlp_out"]
        log_probs = jax.nn.log_softmax(h @ params["unembed"])
        return -jnp.mean(jnp.take_along_axis(log_probs, y[..., None], axis=-1))

    held = sequences(np.random.default_rng(500 + variant), 512)
    return Task(
        "transformer",
        init,
        loss,
        lambda seed: _endless(lambda r: sequences(r, 32), 1000 * variant + seed),
        lambda: held,
        steps=200,
    )


_BUILDERS = {
    "quadratic": _quadratic,
    "logistic": lambda v: _classification(v, "logistic", 0),
    "mlp": lambda v: _classification(v, "mlp", 32),
    "transformer": _transformer,
}
