"""State buffers kept off their parameter's address modulo 256 MiB (optgen/placement.py)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import count_compiles

import optgen
from optgen.runtime import placement


@pytest.fixture
def fake_addresses(monkeypatch):
    """Addresses chosen by the test: ``at[id(x)]`` for arrays it names, fresh ones (never
    aliasing anything) for copies the code under test makes."""
    at = {}
    fresh = itertools.count(start=0x7000_0012_3000, step=placement.PERIOD + 0x1000 * 7)

    def address(x):
        if x is None:
            return None
        if id(x) not in at:
            at[id(x)] = next(fresh)
        return at[id(x)]

    monkeypatch.setattr(placement, "address", address)
    return at


def test_a_state_on_its_parameters_address_is_copied_elsewhere(fake_addresses):
    p, mu, nu = jnp.arange(6.0), jnp.full(6, 2.0), jnp.full(6, 3.0)
    fake_addresses.update(
        {
            id(p): 5 * placement.PERIOD + 0x40,
            id(mu): 9 * placement.PERIOD + 0x40,
            id(nu): 9 * placement.PERIOD + 0x1040,
        }
    )
    new_mu, new_nu = placement.spread(p, [mu, nu])
    assert new_mu is not mu
    np.testing.assert_array_equal(new_mu, mu)
    assert (fake_addresses[id(new_mu)] - fake_addresses[id(p)]) % placement.PERIOD
    assert new_nu is nu  # 4 KiB off: left where it is


def test_states_of_a_packed_group_are_spread_from_each_other(fake_addresses):
    mu, nu = jnp.ones(4), jnp.zeros(4)
    fake_addresses.update({id(mu): 3 * placement.PERIOD, id(nu): 7 * placement.PERIOD})
    new_mu, new_nu = placement.spread(None, [mu, nu])
    assert new_mu is mu and new_nu is not nu
    np.testing.assert_array_equal(new_nu, nu)


def test_gives_up_after_a_few_copies(monkeypatch):
    monkeypatch.setattr(placement, "address", lambda x: 0)  # every buffer aliases every other
    copies = []
    real_copy = jnp.copy
    monkeypatch.setattr(placement.jnp, "copy", lambda x: copies.append(1) or real_copy(x))
    (state,) = placement.spread(jnp.ones(3), [jnp.full(3, 4.0)])
    assert len(copies) == placement.TRIES
    np.testing.assert_array_equal(state, 4.0)


def test_address_is_read_only_where_it_can_matter():
    big = jnp.zeros(placement.MIN_BYTES // 4, jnp.float32)
    assert placement.address(big) == big.unsafe_buffer_pointer()
    assert placement.address(jnp.zeros(16)) is None  # in cache anyway
    assert placement.address(np.zeros(placement.MIN_BYTES)) is None  # not a jax array
    jax.jit(lambda x: placement.address(x) is None or pytest.fail("traced"))(big)


def test_init_moves_an_aliased_state_and_the_step_still_matches_optax(monkeypatch):
    device = jax.devices()[0]
    params = {
        "w": jax.device_put(
            jnp.linspace(-1.0, 1.0, placement.MIN_BYTES // 4, dtype=jnp.float32), device
        )
    }
    real = placement.address
    calls = []

    def aliased_first_state(x):  # the first state buffer init asks about sits on its parameter
        calls.append(x)
        return 0 if len(calls) in (1, 2) else real(x)

    monkeypatch.setattr(placement, "address", aliased_first_state)
    opt, reference = optgen.load("adamw"), optax.adamw(1e-3, weight_decay=1e-4)
    state, ref_state, ref_params = opt.init(params), reference.init(params), params
    assert len(calls) > 2  # the aliased state was copied and looked at again
    compiles = []
    for step in range(3):
        grads = {"w": jax.device_put(jnp.cos(ref_params["w"] * (step + 1)), device)}
        updates, ref_state = reference.update(grads, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)
        with count_compiles() as counter:
            params, state = opt.step(params, grads, state)
        compiles.append(counter.n)
    np.testing.assert_allclose(params["w"], ref_params["w"], rtol=1e-6, atol=1e-7)
    assert compiles[1:] == [0, 0]
