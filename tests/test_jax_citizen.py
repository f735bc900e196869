"""The optimizer as a JAX object: it behaves as the optax optimizer it replaces under
``optax.inject_hyperparams``, ``jax.grad``/``jvp``/``vmap``/``scan``/``checkpoint``, and in
flax (nnx, linen), equinox, ``flax.serialization`` and ``jax.export`` — same numbers
(float64 to 1e-12 where both compute in float64)."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close, count_compiles, rel_err, run_steps

import optgen
from optgen.diagnostics import InputError


def params_f64():
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.normal(size=(4, 3))),
        "b": jnp.asarray(rng.normal(size=(3,))),
        "s": jnp.asarray(rng.normal()),
    }


def grads_at(params, step):
    return jax.tree.map(lambda p: jnp.sin(p * (step + 1)) + 0.1 * p, params)


def run(opt, params, steps=5):
    return run_steps(opt, params, steps, grads_at=grads_at)[0]


@pytest.mark.parametrize("schedule", [False, True], ids=["constant", "schedule"])
def test_inject_hyperparams_gives_optax_numbers(x64, schedule):
    lr = optax.cosine_decay_schedule(0.1, 12) if schedule else 0.05

    def factory(learning_rate, weight_decay):
        return optgen.load("adamw", learning_rate=learning_rate, weight_decay=weight_decay)

    runs = []
    for make in (factory, optax.adamw):
        opt = optax.inject_hyperparams(make)(learning_rate=lr, weight_decay=1e-2)
        update = jax.jit(opt.update)
        params = params_f64()
        state = opt.init(params)
        for step in range(12):
            if step == 6 and not schedule:  # the optax way to change a rate between steps
                state.hyperparams["learning_rate"] = jnp.asarray(0.01)
            updates, state = update(grads_at(params, step), state, params)
            params = optax.apply_updates(params, updates)
        runs.append(params)
    assert_trees_close(*runs, 1e-12)


def test_inject_hyperparams_loads_the_spec_once():
    opt = optax.inject_hyperparams(
        lambda learning_rate: optgen.load("adamw", learning_rate=learning_rate)
    )(learning_rate=0.1)
    params = jax.device_put(params_f64(), jax.devices()[0])
    state = opt.init(params)
    opt.update(grads_at(params, 0), state, params)  # compiles the step once
    with count_compiles() as compiles:
        for step in range(1, 4):  # un-jitted: optax loads the optimizer again at every update
            updates, state = opt.update(grads_at(params, step), state, params)
    assert compiles.n == 0


def loss_after(opt, params, offset=None, steps=3, use_step=False):
    def shifted(params, step):  # a learned change of the gradients
        grads = grads_at(params, step)
        return grads if offset is None else jax.tree.map(jnp.add, grads, offset)

    params, _ = run_steps(
        opt, params, steps, path="step" if use_step else "update", grads_at=shifted
    )
    return sum(jnp.sum(x**2) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("use_step", [False, True], ids=["update", "step"])
def test_grad_through_the_update_matches_optax(x64, use_step):
    ours = optgen.load("adamw", learning_rate=0.05, weight_decay=1e-2)
    ref = optax.adamw(0.05, weight_decay=1e-2)
    by_params = [
        jax.grad(lambda p, o=o, s=s: loss_after(o, p, use_step=s))(params_f64())
        for o, s in ((ours, use_step), (ref, False))
    ]
    assert_trees_close(*by_params, 1e-12)
    offset = jax.tree.map(lambda p: 0.1 * jnp.cos(p), params_f64())
    by_grads = [
        jax.grad(lambda d, o=o: loss_after(o, params_f64(), offset=d))(offset) for o in (ours, ref)
    ]
    assert_trees_close(*by_grads, 1e-12)
    by_rate = [
        jax.grad(lambda lr, f=f: loss_after(f(lr), params_f64()))(0.05)
        for f in (
            lambda lr: optgen.load("adamw", learning_rate=lr, weight_decay=1e-2),
            lambda lr: optax.adamw(lr, weight_decay=1e-2),
        )
    ]
    assert rel_err(*by_rate) <= 1e-12 and abs(float(by_rate[0])) > 0


def test_jvp_and_linearize_through_the_update_match_optax(x64):
    params = params_f64()
    tangent = jax.tree.map(jnp.cos, params)
    results = [
        jax.jvp(lambda p, o=o: loss_after(o, p), (params,), (tangent,))
        for o in (optgen.load("nadamw", learning_rate=0.05), optax.nadamw(0.05))
    ]
    assert rel_err(results[0][0], results[1][0]) <= 1e-12
    assert rel_err(results[0][1], results[1][1]) <= 1e-12


def test_vmap_over_models_and_over_learning_rates_matches_optax(x64):
    models = jax.tree.map(lambda x: jnp.stack([x, 2 * x, -x]), params_f64())
    per_model = [
        jax.vmap(lambda p, o=o: run(o, p))(models)
        for o in (optgen.load("adamw", learning_rate=0.05), optax.adamw(0.05))
    ]
    assert_trees_close(*per_model, 1e-12)
    rates = jnp.asarray([0.01, 0.05, 0.2])
    per_rate = [
        jax.vmap(lambda lr, f=f: run(f(lr), params_f64()))(rates)
        for f in (lambda lr: optgen.load("adamw", learning_rate=lr), lambda lr: optax.adamw(lr))
    ]
    assert_trees_close(*per_rate, 1e-12)
    assert not np.allclose(per_rate[0]["w"][0], per_rate[0]["w"][2])  # each rate really ran


def test_a_batched_hyperparameter_in_the_state_is_vmapped(x64):
    opt, ref = optgen.load("adamw"), optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3)
    params = params_f64()
    rates = jnp.asarray([0.01, 0.1])

    def with_rate(o, lr):
        state = o.init(params)
        state.hyperparams["learning_rate"] = lr
        updates, _ = o.update(grads_at(params, 0), state, params)
        return updates

    assert_trees_close(
        jax.vmap(lambda lr: with_rate(opt, lr))(rates),
        jax.vmap(lambda lr: with_rate(ref, lr))(rates),
        1e-12,
    )


def test_scan_and_checkpoint_give_the_loop_numbers(x64):
    opt = optgen.load("adamw", learning_rate=0.05)
    params = params_f64()

    @jax.checkpoint
    def body(carry, step):
        p, s = carry
        updates, s = opt.update(grads_at(p, 0), s, p)
        return (optax.apply_updates(p, updates), s), None

    (scanned, _), _ = jax.lax.scan(body, (params, opt.init(params)), jnp.arange(4))
    looped, _ = run_steps(opt, params, 4, grads_at=lambda p, _: grads_at(p, 0))
    assert_trees_close(scanned, looped, 1e-14)


def test_deepcopy_gives_a_working_optimizer():
    opt = optgen.load("adamw", learning_rate=0.1)
    twin = copy.deepcopy(opt)
    params = {"w": jnp.ones(3)}
    state = twin.init(params)
    np.testing.assert_array_equal(
        twin.update({"w": jnp.ones(3)}, state, params)[0]["w"],
        opt.update({"w": jnp.ones(3)}, opt.init(params), params)[0]["w"],
    )


def test_bf16_params_take_float32_gradients_as_optax_does():
    params = {"w": jnp.linspace(-1, 1, 64, dtype=jnp.bfloat16).reshape(8, 8)}
    ours, ref = optgen.load("adam", learning_rate=1e-2), optax.adam(1e-2)
    got, want = jax.tree.map(jnp.copy, params), params  # step donates got
    state, ref_state = ours.init(params), ref.init(params)
    for step in range(5):
        grads = {"w": jnp.cos(want["w"].astype(jnp.float32) * (step + 1))}  # float32
        got, state = ours.step(got, grads, state)
        updates, ref_state = ref.update(grads, ref_state, want)
        want = optax.apply_updates(want, updates)
    assert got["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(got["w"]), np.float32(want["w"]), rtol=2e-2, atol=1e-2)


def test_update_without_params_where_the_spec_does_not_need_them(x64):
    params = params_f64()
    ours, ref = optgen.load("adam", learning_rate=0.1), optax.adam(0.1)
    state, ref_state = ours.init(params), ref.init(params)
    for step in range(4):
        updates, state = ours.update(grads_at(params, step), state)
        want, ref_state = ref.update(grads_at(params, step), ref_state)
        assert_trees_close(updates, want, 1e-14)
    with pytest.raises(InputError) as err:  # AdamW's change depends on p (weight decay)
        optgen.load("adamw").update(grads_at(params, 0), optgen.load("adamw").init(params))
    assert err.value.code == "E301"


def test_state_prints_its_values_like_optax():
    state = optgen.load("adamw").init({"w": jnp.full(3, 2.0), "b": jnp.ones(2)})
    text = repr(state)
    assert "Array(" in text and "mu" in text and "'w'" in text and "PackedState" not in text


def test_state_is_shaped_like_the_params_whatever_their_size():
    params = {f"b{i}": jnp.ones(8) for i in range(5)} | {"w": jnp.ones((64, 64))}
    state = optgen.load("adamw").init(params)
    for name in ("mu", "nu"):
        assert jax.tree.structure(state.slots[name]) == jax.tree.structure(params)
        jax.tree.map(
            lambda p, m: np.testing.assert_array_equal(p.shape, m.shape), params, state.slots[name]
        )


def test_a_vector_schedule_is_refused():
    opt = optgen.load("adamw", learning_rate=lambda count: jnp.ones(3) * 0.1)
    params = {"w": jnp.ones(3)}
    with pytest.raises(InputError) as err:
        opt.init(params)
    assert err.value.code == "E380" and "learning_rate" in err.value.message


def test_complex_params_are_refused_with_the_fix():
    with pytest.raises(InputError) as err:
        optgen.load("adamw").init({"z": jnp.ones(3, jnp.complex64)})
    assert err.value.code == "E310" and "complex" in err.value.message


@pytest.mark.parametrize(
    "value, fragment", [(np.complex64(1e-3 + 1j), "complex"), (1e39, "beyond float32")]
)
def test_a_hyperparameter_that_would_change_silently_is_refused(value, fragment):
    # a complex rate lost its imaginary part; 1e39 became inf in the float32 step
    with pytest.raises(InputError) as err:
        optgen.load("adamw", learning_rate=value)
    assert err.value.code == "E305" and fragment in err.value.message
