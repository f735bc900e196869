"""optgen.load(..., stochastic_rounding=True): float32 values stored in bf16 round stochastically
(codegen/rounding.py), alike on XLA's loops and optgen's own CPU loop, unbiased, and making
progress where round-to-nearest stalls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from optgen.codegen import ffi_runtime, primitive

import optgen
from optgen.diagnostics import InputError

BF16 = ml_dtypes.bfloat16
# Stores each parameter's float32 value in a bf16 state: the rounding alone, nothing else.
PROBE = """optimizer probe "stores each parameter's float32 value in a bf16 state"

state m: bf16 = 0

update:
  m = p
  p = p - 0 * g
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "probe.spec"
    path.write_text(PROBE)
    return str(path)


def stored(spec, params, lowering, steps, **options):
    """The probe's bf16 state after each of ``steps`` steps, as float64 arrays per parameter."""
    opt = optgen.load(spec, lowering=lowering, **options)
    params = {k: jnp.asarray(v) for k, v in params.items()}
    state = opt.init(params)
    grads = jax.tree.map(jnp.zeros_like, params)
    seen = []
    for _ in range(steps):
        params, state = opt.step(params, grads, state)
        seen.append({k: np.asarray(v, np.float64) for k, v in state.slots["m"].items()})
    return seen


# ---- a NumPy reference of the hash and the rounding, written from codegen/rounding.py's docstring


def lowbias32(x):
    x = x.astype(np.uint32)
    for shift, factor in ((16, 0x7FEB352D), (15, 0x846CA68B), (16, None)):
        x ^= x >> np.uint32(shift)
        if factor is not None:
            x = (x.astype(np.uint64) * factor % 2**32).astype(np.uint32)
    return x


def reference(x, t: int, leaf: int, output: int):
    """x (float32) rounded to bf16 as the step should: 16 hashed bits added below the mantissa."""
    mixed = np.uint32(leaf * 0x9E3779B9 % 2**32) ^ np.uint32(output * 0x85EBCA6B % 2**32)
    key = lowbias32(lowbias32(np.array([t])) ^ mixed)
    bits = lowbias32((np.arange(x.size, dtype=np.uint64) + key) % 2**32).reshape(x.shape)
    raised = (x.view(np.uint32).astype(np.uint64) + (bits & 0xFFFF)) % 2**32
    rounded = (raised.astype(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    return np.where(np.isnan(x), x, rounded).astype(BF16).astype(np.float64)


def many_params(seed):
    """More parameters than one call of the loop takes, one over several chunks, a matrix."""
    rng = np.random.default_rng(seed)
    params = {f"s{i:03d}": rng.normal(size=int(rng.integers(1, 40))) for i in range(70)}
    params |= {"big": rng.normal(size=3 * ffi_runtime.CHUNK_ELEMENTS + 5)}
    params |= {"m": rng.normal(size=(33, 7))}
    return {k: v.astype(np.float32) for k, v in params.items()}


@pytest.mark.parametrize("lowering", ["ffi", "shared"])
def test_the_stored_bits_are_the_reference_hash_on_both_lowerings(probe, lowering):
    assert len(many_params(0)) > primitive.FFI_MAX_LEAVES  # the loop runs as several calls
    params = many_params(0)
    params["s000"][:3] = [np.nan, np.inf, -np.inf]
    seen = stored(probe, params, lowering, steps=2, stochastic_rounding=True)
    names = sorted(params)  # the order of jax.tree.leaves, which numbers the parameters
    output = [name for name, _ in optgen.load(probe).compiled.program.update.outputs].index("m")
    for t, step in enumerate(seen, start=1):
        for leaf, name in enumerate(names):
            expected = reference(params[name], t, leaf, output)
            np.testing.assert_array_equal(step[name], expected, err_msg=f"{name}, step {t}")


# ---- unbiased: each value rounds up with the probability of its distance below


FRACTIONS = np.array([0.1, 0.25, 0.5, 0.9])  # where x lies between its bf16 neighbours
SAMPLES = 4096  # elements per value, each with its own bits


def between_neighbours():
    """Values at FRACTIONS of the way from a bf16 value to the next, of both signs, repeated."""
    low = np.array([1.0, 3.0, -0.75, -1024.0], np.float32)
    ulp = np.array([float(np.spacing(BF16(v))) for v in np.abs(low)], np.float64)
    x = (np.abs(low) + FRACTIONS * ulp) * np.sign(low)
    return x.astype(np.float32), ulp


@pytest.mark.parametrize("lowering", ["ffi", "shared"])
def test_the_rounding_is_unbiased(probe, lowering):
    x, ulp = between_neighbours()
    params = {"x": np.repeat(x, SAMPLES)}
    steps = 3
    rounded = np.stack(
        [s["x"] for s in stored(probe, params, lowering, steps, stochastic_rounding=True)]
    )
    rounded = rounded.reshape(steps, len(x), SAMPLES)
    down = np.trunc(x.astype(np.float64) / ulp) * ulp  # toward zero: the bf16 value below |x|
    up = down + np.sign(x) * ulp
    assert np.all((rounded == down[None, :, None]) | (rounded == up[None, :, None]))
    n = steps * SAMPLES
    sigma = ulp * np.sqrt(FRACTIONS * (1 - FRACTIONS) / n)
    mean = rounded.mean(axis=(0, 2))
    assert np.all(np.abs(mean - x) < 5 * sigma), (mean - x) / sigma
    # the same check fails round-to-nearest (the bound can fail)
    nearest = stored(probe, params, lowering, 1)[0]["x"].reshape(len(x), SAMPLES).mean(axis=1)
    assert np.any(np.abs(nearest - x) > 5 * sigma)


def test_the_bits_change_with_the_step_the_parameter_and_the_element(probe):
    params = {"a": np.full(256, 1.001, np.float32), "b": np.full(256, 1.001, np.float32)}
    first, second = stored(probe, params, "shared", 2, stochastic_rounding=True)
    assert not np.array_equal(first["a"], first["b"])  # parameters of one shape and value
    assert not np.array_equal(first["a"], second["a"])  # steps
    assert len(set(first["a"])) == 2  # elements: both neighbours occur


# ---- the option on real optimizers


def bf16_tree(seed):
    return {
        k: jnp.asarray(v, jnp.bfloat16) for k, v in many_params(seed).items() if k in ("big", "m")
    } | {"s": jnp.asarray(np.random.default_rng(seed).normal(size=70), jnp.bfloat16)}


def adamw_run(lowering, steps=3, **options):
    opt = optgen.load("adamw", learning_rate=1e-2, lowering=lowering, **options)
    params = bf16_tree(0)
    state = opt.init(params)
    for k in range(steps):
        grads = jax.tree.map(
            lambda p, k=k: (p.astype(jnp.float32) * 0.3 + 0.1 * k).astype(p.dtype), params
        )
        params, state = opt.step(params, grads, state)
    return params, state.slots


def test_adamw_with_bf16_params_and_state_is_bit_identical_on_both_lowerings():
    ours, xla = (
        adamw_run("ffi", stochastic_rounding=True),
        adamw_run("shared", stochastic_rounding=True),
    )
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(xla), strict=True):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))
    nearest = adamw_run("shared")
    assert any(
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(xla), jax.tree.leaves(nearest), strict=True)
    )


def test_float32_stores_are_untouched():
    params = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(9, 5)), jnp.float32)}
    results = []
    for options in ({}, {"stochastic_rounding": True}):
        opt = optgen.load("adamw", **options)
        p, s = jax.tree.map(jnp.copy, params), opt.init(params)
        p, s = opt.step(p, jax.tree.map(lambda x: 0.1 * x, p), s)
        results.append(np.asarray(p["w"]))
    np.testing.assert_array_equal(*results)


@pytest.mark.parametrize("lowering", ["ffi", "shared"])
def test_tiny_updates_move_bf16_params_where_nearest_stalls(lowering):
    """AdamW with lr 1e-4 on 0.5 * (p - 0.5)^2 from p = 1: each step moves p by about 1e-4,
    under half of bf16's ulp at 1 (2^-8): round-to-nearest never leaves 1.0; stochastic rounding
    follows float32 optax in expectation."""
    steps, hypers = 300, dict(learning_rate=1e-4, weight_decay=0.0)
    start = jnp.ones(4096, jnp.float32)

    def train(opt, params, state, step):
        for _ in range(steps):
            grads = params - jnp.asarray(0.5, params.dtype)
            params, state = step(opt, params, grads, state)
        return np.asarray(params, np.float64)

    def optgen_step(opt, p, g, s):
        return opt.step(p, g, s)

    def optax_step(opt, p, g, s):
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s

    reference = train(optax.adamw(**hypers), start, optax.adamw(**hypers).init(start), optax_step)
    results = {}
    for options in ({}, {"stochastic_rounding": True}):
        opt = optgen.load("adamw", lowering=lowering, **hypers, **options)
        p = start.astype(jnp.bfloat16)
        results[bool(options)] = train(opt, p, opt.init(p), optgen_step)
    assert np.all(results[False] == 1.0)  # stalled
    moved = 1.0 - reference.mean()
    assert moved > 0.025
    # each element is a random walk around the float32 path (spread ~ ulp * sqrt(steps) / 2); their
    # mean follows it: 5% of the distance moved is about 9 standard errors of the mean here
    assert abs(results[True].mean() - reference.mean()) < 0.05 * moved
    assert results[True].std() < 0.5 * moved


def test_auto_takes_the_own_loop_where_it_can():
    """XLA:CPU leaves a stochastically rounded bf16 step in two loops (docs/fusion.md)."""
    from optgen.codegen import fusion

    cpu, bf16 = fusion.Where(("cpu",)), np.dtype(BF16)
    assert fusion.resolve("auto", cpu, [[bf16], [bf16]]) == "per-output"
    assert fusion.resolve("auto", cpu, [[bf16], [bf16]], stochastic=True) == "ffi"
    exported = fusion.Where(("cpu",), for_export=True)
    assert fusion.resolve("auto", exported, [[bf16], [bf16]], stochastic=True) == "per-output"


def test_a_symbolic_matrix_shape_is_refused_with_a_hint():
    from optgen.codegen import export

    opt = optgen.load("sgd", stochastic_rounding=True)
    program = opt.compiled.program
    dtypes = export.state_dtypes(program, np.dtype(BF16))
    specs = export.arg_specs(program, np.dtype(BF16), "n,m", dtypes)
    with pytest.raises(InputError) as err:
        jax.export.export(jax.jit(export.kernel(program, dtypes)))(specs)
    assert err.value.code == "E420" and "--shape 64,32" in str(err.value)


def test_vmap_takes_the_plain_path_with_the_same_bits():
    """Under jax.vmap the step is the IR in jnp ops (codegen/jnp_backend.py): each model of the
    batch rounds as it would alone."""
    opt = optgen.load("adamw", learning_rate=1e-2, stochastic_rounding=True)
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(2, 300)), jnp.bfloat16)}
    grads = jax.tree.map(lambda x: x * 0.5, params)
    state = opt.init({"w": params["w"][0]})
    alone = [
        opt.update({"w": grads["w"][i]}, state, {"w": params["w"][i]})[1].slots["mu"]["w"]
        for i in range(2)
    ]
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), state)
    batched = jax.vmap(opt.update)(grads, stacked, params)[1].slots["mu"]["w"]
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(batched[i]), np.asarray(alone[i]))
