"""A step over many parameters runs as several executables (optgen/runtime/parts.py): the numbers
of one call, bit for bit, one compile for equal parts, and nothing of the user's lost on a misfit.

The thresholds are lowered here (parts of 310 parameters above 600) so each executable compiles
in about a second; every part and the whole stay above XLA_PREFERRED_MAX_LEAVES, so both run
optgen's own loop, as they do at the real thresholds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close, count_compiles

import optgen
from optgen.diagnostics import InputError
from optgen.runtime import parts

LEAVES = 620
# 620 leaves in parts of 310: both parts have the same shapes, so one executable
SHAPES = [(5, 3), (7,), (64, 80), (1,), (6,)]


@pytest.fixture
def small_parts(monkeypatch):
    monkeypatch.setattr(parts, "PART_LEAVES", 310)
    monkeypatch.setattr(parts, "SPLIT_ABOVE_LEAVES", 600)


def tree(seed: int, scale: float = 1.0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        f"w{i:04d}": jnp.asarray(scale * rng.normal(size=SHAPES[i % len(SHAPES)]), jnp.float32)
        for i in range(LEAVES)
    }


def run(opt, steps: int, **inputs):
    """``steps`` steps from ``init``, then one ``update``: everything they return."""
    params, grads = tree(0), tree(1, 0.1)
    state = opt.init(params)
    for _ in range(steps):
        params, state = opt.step(params, grads, state, **inputs)
    updates, after = opt.update(grads, state, params, **inputs)
    return params, state, updates, after


def test_bounds_cover_the_leaves_in_equal_parts():
    for count in (1025, 2049, 4096, 10_000, 10_001):
        pieces = parts.bounds(count)
        assert pieces[0][0] == 0 and pieces[-1][1] == count
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:], strict=False))
        sizes = {stop - start for start, stop in pieces}
        assert max(sizes) <= parts.PART_LEAVES and max(sizes) - min(sizes) <= 1
    assert parts.bounds(10_000) == [(i * 1000, (i + 1) * 1000) for i in range(10)]


@pytest.mark.parametrize(
    "spec",
    ["adamw", "adamw8bit", "schedule_free_adamw", "sophia"],
)
def test_parts_give_the_numbers_of_one_call(spec, monkeypatch):
    """init, step and update in parts equal one call bit for bit: per-element, 8-bit and per-step
    states, and an extra input (sophia's Hessian estimate)."""
    opt = optgen.load(spec)
    inputs = {"hessian": tree(2, 0.01)} if spec == "sophia" else {}
    assert opt._plan.splittable
    calls = []
    monkeypatch.setattr(parts, "run", lambda *a, run=parts.run: calls.append(1) or run(*a))
    whole = run(opt, 3, **inputs)
    assert not calls
    monkeypatch.setattr(parts, "PART_LEAVES", 310)
    monkeypatch.setattr(parts, "SPLIT_ABOVE_LEAVES", 600)
    split = run(opt, 3, **inputs)
    assert len(calls) == 4  # three steps and the update
    assert jax.tree.structure(split) == jax.tree.structure(whole)
    for got, want in zip(jax.tree.leaves(split), jax.tree.leaves(whole), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_row_and_column_states_in_parts(monkeypatch):
    """adafactor's factored state (rows, columns) put back together from parts. Parts this small
    run XLA's loops, which may round an ulp differently when grouped otherwise: compared to
    1e-6, not bit for bit."""
    rng = np.random.default_rng(3)
    shapes = [(12, 9), (7,), (3, 4, 5), (1,)]
    params = {
        f"w{i:02d}": jnp.asarray(rng.normal(size=shapes[i % 4]), jnp.float32) for i in range(23)
    }
    grads = jax.tree.map(lambda x: 0.1 * x + 0.05, params)
    opt = optgen.load("adafactor")
    results = []
    for part, above in ((10**6, 10**6), (8, 16)):
        monkeypatch.setattr(parts, "PART_LEAVES", part)
        monkeypatch.setattr(parts, "SPLIT_ABOVE_LEAVES", above)
        p, s = jax.tree.map(jnp.copy, params), opt.init(params)
        for _ in range(3):
            p, s = opt.step(p, grads, s)
        results.append((p, s))
    assert jax.tree.structure(results[0]) == jax.tree.structure(results[1])
    assert_trees_close(results[1], results[0], 1e-6)


def test_parts_match_optax(small_parts, x64):
    opt = optgen.load("adamw", learning_rate=1e-2, weight_decay=1e-2)
    reference = optax.adamw(1e-2, weight_decay=1e-2)
    params = jax.tree.map(lambda x: x.astype(jnp.float64), tree(0))
    grads = jax.tree.map(lambda x: x.astype(jnp.float64), tree(1, 0.1))
    want, ref_state = jax.tree.map(jnp.copy, params), reference.init(params)
    state = opt.init(params)
    for _ in range(5):
        params, state = opt.step(params, grads, state)
        updates, ref_state = reference.update(grads, ref_state, want)
        want = optax.apply_updates(want, updates)
    assert_trees_close(params, want, 1e-12, dtype=np.float64)
    assert_trees_close(state.slots["mu"], ref_state[0].mu, 1e-12)
    assert_trees_close(state.slots["nu"], ref_state[0].nu, 1e-12)


def test_equal_parts_compile_once(small_parts):
    jax.clear_caches()
    opt = optgen.load("adamw", learning_rate=3e-3)
    params, grads = tree(0), tree(1, 0.1)
    state = opt.init(params)
    jax.block_until_ready(state)
    with count_compiles() as compiles:
        for _ in range(3):
            params, state = opt.step(params, grads, state)
        jax.block_until_ready(params)
    assert compiles.n == 1


def test_a_misfit_in_a_later_part_loses_nothing(small_parts):
    """A wrong gradient in the second part is reported in the user's tree before the first part
    gives up (donates) its parameters and state."""
    opt = optgen.load("adamw")
    params, grads = tree(0), tree(1, 0.1)
    state = opt.init(params)
    params, state = opt.step(params, grads, state)  # the right shapes have run once
    grads["w0500"] = jnp.zeros((4,), jnp.float32)
    with pytest.raises(InputError, match=r"w0500"):
        opt.step(params, grads, state)
    assert not any(x.is_deleted() for x in jax.tree.leaves((params, state)))


@pytest.mark.parametrize(
    "spec, options",
    [
        ("prodigy", {}),  # a global sum in the update
        ("adamw", {"global_clipnorm": 1.0}),  # a norm over every parameter
        ("adamw", {"exclude_from_weight_decay": ["w0001"]}),  # a mask looked up by path
        ("adamw", {"pack": True}),
    ],
)
def test_steps_over_every_parameter_stay_one_call(spec, options, small_parts, monkeypatch):
    opt = optgen.load(spec, **options)
    assert not opt._plan.splittable
    monkeypatch.setattr(parts, "run", lambda *a: pytest.fail("split"))
    params, grads = tree(0), tree(1, 0.1)
    params, _ = opt.step(params, grads, opt.init(params))
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params))
