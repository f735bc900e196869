"""optgen optimizers in the JAX ecosystem's own loops: flax nnx and linen, equinox,
``flax.serialization``, orbax, and a serialized ``jax.export`` train step — each beside the
optax optimizer it replaces, with the same numbers. Libraries not installed skip with the reason
(``pip install -e '.[frameworks]'``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import rel_err

import optgen


def assert_trees_close(got, want, rtol):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert rel_err(a, b) <= rtol, rel_err(a, b)


def data(n=16):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(np.sin(x @ rng.normal(size=(5, 2))).astype(np.float32))


OPTIMIZERS = (
    lambda: optgen.load("adamw", learning_rate=1e-2, weight_decay=1e-3),
    lambda: optax.adamw(1e-2, weight_decay=1e-3),
)


def test_flax_nnx_optimizer_trains_like_optax():
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):  # biases: several small parameters
        def __init__(self, rngs):
            self.hidden = nnx.Linear(5, 8, rngs=rngs)
            self.out = nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            return self.out(jax.nn.tanh(self.hidden(x)))

    @nnx.jit
    def train_step(model, optimizer, x, y):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)

    x, y = data()
    trained = []
    for make in OPTIMIZERS:
        model = Model(nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, make(), wrt=nnx.Param)
        for _ in range(10):
            train_step(model, optimizer, x, y)
        trained.append(nnx.state(model, nnx.Param))
    assert_trees_close(*trained, rtol=2e-5)


def test_flax_linen_train_state_trains_like_optax():
    nn = pytest.importorskip("flax.linen")
    from flax.training import train_state

    model = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(2)])
    x, y = data()
    params = model.init(jax.random.key(0), x)

    @jax.jit
    def train_step(state):
        grads = jax.grad(lambda p: jnp.mean((state.apply_fn(p, x) - y) ** 2))(state.params)
        return state.apply_gradients(grads=grads)

    trained = []
    for make in OPTIMIZERS:
        state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=make())
        for _ in range(10):
            state = train_step(state)
        trained.append(state.params)
    assert_trees_close(*trained, rtol=2e-5)


def test_equinox_filtered_loop_trains_like_optax():
    eqx = pytest.importorskip("equinox")
    x, y = data()
    trained = []
    for make in OPTIMIZERS:
        model = eqx.nn.MLP(5, 2, 8, 2, key=jax.random.key(0))
        opt = make()
        state = opt.init(eqx.filter(model, eqx.is_array))

        @eqx.filter_jit
        def train_step(model, state, opt=opt):
            grads = eqx.filter_grad(lambda m: jnp.mean((jax.vmap(m)(x) - y) ** 2))(model)
            updates, state = opt.update(grads, state, eqx.filter(model, eqx.is_array))
            return eqx.apply_updates(model, updates), state

        for _ in range(10):
            model, state = train_step(model, state)
        trained.append(eqx.filter(model, eqx.is_array))
    assert_trees_close(*trained, rtol=2e-5)


def trained_state():
    opt = optgen.load("adamw", learning_rate=1e-2)
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    state = opt.init(params)
    for _ in range(3):
        updates, state = opt.update(jax.tree.map(jnp.cos, params), state, params)
        params = optax.apply_updates(params, updates)
    return opt, params, state


def test_flax_serialization_round_trips_the_state():
    serialization = pytest.importorskip("flax.serialization")
    opt, params, state = trained_state()
    back = serialization.from_bytes(opt.init(params), serialization.to_bytes(state))
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_exported_train_step_serializes_and_runs():
    opt, params, state = trained_state()
    chained = optax.chain(optax.clip(1.0), opt)  # optax's own state types travel too
    chained_state = chained.init(params)

    def train_step(params, state):
        updates, state = chained.update(jax.tree.map(jnp.sin, params), state, params)
        return optax.apply_updates(params, updates), state

    optgen.register_optax_states()
    exported = jax.export.export(jax.jit(train_step))(params, chained_state)
    restored = jax.export.deserialize(exported.serialize())
    got = restored.call(params, chained_state)
    want = jax.jit(train_step)(params, chained_state)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_orbax_round_trips_the_state(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    opt, params, state = trained_state()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", state)
        checkpointer.wait_until_finished()
        back = checkpointer.restore(tmp_path / "state", jax.eval_shape(opt.init, params))
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    params, restored_next = opt.step(params, jax.tree.map(jnp.cos, params), back)  # steps as it is
    assert int(restored_next.count) == 4
