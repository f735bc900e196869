"""Multi-tensor packing (``optgen.load(..., pack=True)``): small parameters' state in flat buffers,
with the same numbers as unpacked; the default state is shaped like the parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from conftest import make_grads, run_steps

import optgen
from optgen.kernel_report import count_kernels
from optgen.runtime import packing

BIG = packing.PACK_MAX_ELEMENTS + 1


def packable_params(seed=0):
    """Ten small f32 leaves of several shapes, two small bf16 leaves, one f32 leaf above the
    threshold.
    """
    rng = np.random.default_rng(seed)
    params = {f"b{i}": rng.normal(size=(3 + 5 * i,)).astype(np.float32) for i in range(8)}
    params["ln"] = {
        "scale": rng.normal(size=(4, 6)).astype(np.float32),
        "bias": np.float32(rng.normal()),
    }
    params["h16"] = [
        rng.normal(size=(9,)).astype(ml_dtypes.bfloat16),
        rng.normal(size=(2, 2)).astype(ml_dtypes.bfloat16),
    ]
    params["big"] = rng.normal(size=(BIG,)).astype(np.float32)
    return jax.tree.map(jnp.asarray, params)


def load(spec, **kwargs):
    return optgen.load(spec, pack=True, **kwargs)


def test_small_parameters_share_one_buffer_per_state_and_dtype():
    params = packable_params()
    state = load("adamw").init(params)
    mu = state.slots["mu"]
    assert isinstance(mu, packing.PackedState)
    arrays = sorted(((x.dtype.name, x.shape) for x in jax.tree.leaves(mu)), key=str)
    small_f32 = sum(
        x.size for x in jax.tree.leaves(params) if x.dtype == jnp.float32 and x.size < BIG
    )
    assert arrays == sorted(
        [("bfloat16", (9 + 4,)), ("float32", (BIG,)), ("float32", (small_f32,))], key=str
    )


def test_packed_state_reads_like_the_parameters():
    params = packable_params()
    opt = load("adamw", learning_rate=0.1)
    state = opt.init(params)
    params, state = opt.step(params, make_grads(params, 0), state)
    view = state.slots["nu"].tree()
    assert jax.tree.structure(view) == jax.tree.structure(params)
    assert all(
        v.shape == p.shape
        for v, p in zip(jax.tree.leaves(view), jax.tree.leaves(params), strict=True)
    )
    np.testing.assert_array_equal(state.slots["nu"]["ln"]["scale"], view["ln"]["scale"])
    assert np.all(np.asarray(view["ln"]["scale"]) > 0)  # nu after one step is (1 - b2) g^2


@pytest.mark.parametrize(
    "spec, options",
    [
        ("adamw", {}),
        ("amsgrad", {}),
        ("nadamw", {}),
        # reductions over every parameter are the same total on groups as on their members
        ("adamw", {"global_clipnorm": 0.5}),
        ("adamw", {"skip_nonfinite": True}),
        ("lion", {"global_clipnorm": 0.5}),
    ],
    ids=[
        "adamw",
        "amsgrad",
        "nadamw",
        "adamw-global_clipnorm",
        "adamw-skip_nonfinite",
        "lion-global_clipnorm",
    ],
)
def test_packed_steps_match_unpacked_steps(spec, options):
    runs = {}
    for packed in (True, False):
        opt = optgen.load(spec, pack=packed, learning_rate=1e-2, **options)
        assert (
            isinstance(opt.init(packable_params()).slots[opt.state_names[0]], packing.PackedState)
            == packed
        )

        def grads_at(params, step):
            grads = make_grads(params, step)
            # a non-finite gradient in a packed leaf skips the step
            if step == 5 and options.get("skip_nonfinite"):
                grads["b3"][2] = np.inf
            return grads

        params, state = run_steps(opt, packable_params(), 20, path="step", grads_at=grads_at)
        slots = {
            k: v.tree() if isinstance(v, packing.PackedState) else v for k, v in state.slots.items()
        }
        runs[packed] = (params, slots)
    for a, b in zip(jax.tree.leaves(runs[True]), jax.tree.leaves(runs[False]), strict=True):
        tolerance = 1e-2 if a.dtype == jnp.bfloat16 else 1e-6
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tolerance, atol=tolerance
        )
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(runs[True]))


def test_packed_update_follows_the_optax_protocol():
    ours, ref = load("adamw", learning_rate=1e-2), optax.adamw(1e-2, weight_decay=1e-4)
    mine, s1 = run_steps(ours, packable_params(), 10)
    theirs, _ = run_steps(ref, packable_params(), 10)
    assert isinstance(s1.slots["mu"], packing.PackedState)
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs), strict=True):
        tolerance = 2e-2 if a.dtype == jnp.bfloat16 else 1e-5
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tolerance, atol=tolerance
        )


def test_packed_state_round_trips_like_any_pytree():
    # A checkpoint: leaves to host and back, the structure from jax.eval_shape as a restore target
    # would.
    params = packable_params()
    opt = load("adamw", learning_rate=1e-2)
    state = opt.init(params)
    params, state = opt.step(params, make_grads(params, 0), state)
    target = jax.eval_shape(opt.init, params)
    assert jax.tree.structure(target) == jax.tree.structure(state)
    restored = jax.tree.unflatten(
        jax.tree.structure(target), [jnp.asarray(np.asarray(x)) for x in jax.tree.leaves(state)]
    )
    copy = jax.tree.map(jnp.copy, params)
    a, _ = opt.step(params, make_grads(params, 1), state)
    b, _ = opt.step(copy, make_grads(copy, 1), restored)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_step_donates_the_packed_buffers():
    params = packable_params()
    opt = load("adamw")
    state = opt.init(params)
    old = jax.tree.leaves(state.slots)
    opt.step(params, make_grads(params, 0), state)
    assert all(x.is_deleted() for x in old)


def test_many_small_parameters_compile_to_few_kernels():
    params = {f"b{i:03d}": jnp.ones((64 * (1 + i % 4),)) for i in range(200)}
    opt = load("adamw")
    state = opt.init(params)
    hlo = opt.step.lower(params, params, state).compile().as_text()
    per_element, _ = count_kernels(hlo)
    assert per_element < 40  # unpacked: one loop per parameter, 200
    assert len(jax.tree.leaves(state.slots)) == 2


def test_specs_with_per_parameter_reductions_are_not_packed(tmp_path):
    path = tmp_path / "clipped.spec"
    path.write_text(
        "optimizer clipped\nhyper lr = 0.1\nstate m = 0\nupdate:\n"
        "  m = 0.9 * m + g / (norm(g) + 1)\n  p = p - lr * m\n"
    )
    opt = load(str(path))
    params = packable_params()
    state = opt.init(params)
    assert not isinstance(state.slots["m"], packing.PackedState)
    assert jax.tree.structure(state.slots["m"]) == jax.tree.structure(params)


def test_a_state_for_other_parameters_names_the_leaf():
    params = packable_params()
    opt = load("adamw")
    state = opt.init(params)
    params["b0"] = jnp.ones(4)
    with pytest.raises(
        optgen.InputError,
        match=r"E308.*state.slots\['mu'\]\['b0'\] has shape \(3,\), expected \(4,\)",
    ):
        opt.step(params, make_grads(params, 0), state)


@pytest.mark.parametrize(
    "params",
    [
        {"b": np.ones(64), "w": np.ones((BIG,))},  # one small leaf, flattened before a big one
        # one small leaf between two big
        {
            "a": np.ones((BIG,)),
            "b": np.full(5, 2.0),
            "c": np.ones((BIG + 7,)),
        },
    ],
    ids=["small-first", "small-between"],
)
def test_a_lone_small_parameter_keeps_its_own_state(params):
    """A small parameter alone in its dtype group is not packed, and its state stays its own
    although planning lists it after the big parameters; 5 steps as optax.adamw."""
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    opt, reference = load("adamw"), optax.adamw(1e-3, weight_decay=1e-4)
    ref_params, _ = run_steps(reference, params, 5)
    params, state = run_steps(opt, params, 5, path="step")
    for name in params:
        assert state.slots["mu"][name].shape == params[name].shape
        np.testing.assert_allclose(params[name], ref_params[name], rtol=1e-6)
