"""Transforms (options every spec takes): golden IR, and numbers against optax's equivalents."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import as_jax, assert_trees_close, check_golden, make_grads, make_params, run_steps

import optgen

GOLDEN = sorted(pathlib.Path(__file__).parent.joinpath("golden", "transforms").glob("*.ir"))


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.stem)
def test_golden(path, update_golden):
    """Each file's update and init functions through its RUN line (optgen opt --with NAME=VALUE)."""
    check_golden(path, update_golden)


def test_every_transform_has_a_golden_test():
    from optgen.transforms import DEFAULTS

    turned_on = {p.stem for p in GOLDEN}
    assert turned_on == set(DEFAULTS) - {"ema_momentum", "ema_overwrite_frequency", "mask"}


# -- against optax, float64 ------------------------------------------------------------------

STEPS = 40
HYPERS = {"learning_rate": 3e-3, "b1": 0.8, "b2": 0.99, "eps": 1e-6}


def _run(opt, path="step", dtype=np.float64, steps=STEPS, **kwargs):
    """(params, state) after ``steps`` steps of ``opt`` (optgen's, or optax's with
    path="update").
    """
    return run_steps(opt, as_jax(make_params(dtype)), steps, path=path, **kwargs)


OPTAX_EQUIVALENTS = {
    "global_clipnorm": (
        {"global_clipnorm": 1.0},
        lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(**HYPERS)),
    ),
    "clipvalue": ({"clipvalue": 0.5}, lambda: optax.chain(optax.clip(0.5), optax.adam(**HYPERS))),
    "loss_scale_factor": (
        {"loss_scale_factor": 64.0},
        lambda: optax.chain(optax.scale(1 / 64.0), optax.adam(**HYPERS)),
    ),
    "gradient_accumulation_steps": (
        {"gradient_accumulation_steps": 3},
        lambda: optax.MultiSteps(optax.adam(**HYPERS), every_k_schedule=3),
    ),
    "everything_at_once": (
        {"gradient_accumulation_steps": 2, "global_clipnorm": 1.0, "loss_scale_factor": 8.0},
        lambda: optax.chain(
            optax.scale(1 / 8.0),
            optax.MultiSteps(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(**HYPERS)), 2),
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(OPTAX_EQUIVALENTS))
def test_matches_optax_equivalent(case, x64):
    settings, reference = OPTAX_EQUIVALENTS[case]
    want, _ = _run(reference(), path="update", jit=True)
    got, _ = _run(optgen.load("adam", **HYPERS, **settings))
    assert_trees_close(got, want, 1e-9)


def test_exclude_from_weight_decay_and_mask_match_optax_mask(x64):
    def decayed(params):
        return {
            k: jax.tree.map(lambda _, k=k: k not in ("vector", "huge_grad"), v)
            for k, v in params.items()
        }

    want, _ = _run(optax.adamw(**HYPERS, weight_decay=0.1, mask=decayed), path="update", jit=True)
    for kwargs in (
        {"exclude_from_weight_decay": ["vector", "huge"]},
        {"mask": decayed},
        {"mask": decayed(make_params(np.float64))},
        # include fragments override exclude ones (TF Model Garden's rule)
        {
            "exclude_from_weight_decay": ["vector", "huge", "cube"],
            "include_in_weight_decay": ["cu.e"],
        },
        {"exclude_from_weight_decay": "vector,huge", "include_in_weight_decay": "matrix"},
    ):
        got, _ = _run(optgen.load("adamw", **HYPERS, weight_decay=0.1, **kwargs))
        assert_trees_close(got, want, 1e-9)


def _grads_with_nonfinite(params, step):
    grads = make_grads(params, step)
    if step % 7 == 3:
        grads["matrix"] = grads["matrix"].copy()
        grads["matrix"][1, 2] = [np.nan, np.inf, -np.inf][step % 3]
    return grads


def test_skip_nonfinite_matches_apply_if_finite(x64):
    reference = optax.apply_if_finite(optax.adam(**HYPERS), max_consecutive_errors=1000)
    want, want_state = _run(reference, path="update", jit=True, grads_at=_grads_with_nonfinite)
    opt = optgen.load("adam", **HYPERS, skip_nonfinite=True)
    got, state = _run(opt, grads_at=_grads_with_nonfinite)
    assert_trees_close(got, want, 1e-9)
    assert float(state.slots["total_notfinite"]) == int(want_state.total_notfinite) == 6


def test_skipped_step_leaves_params_and_state_bit_identical():
    import ml_dtypes

    opt = optgen.load("adamw", skip_nonfinite=True, use_ema=True, gradient_accumulation_steps=2)

    def bf16(tree):  # grads come in their parameter's dtype (a mismatch is InputError E309)
        return jax.tree.map(lambda x: jnp.asarray(x, ml_dtypes.bfloat16), tree)

    params = bf16(make_params(np.float32))
    state = opt.init(params)
    for step in range(3):
        params, state = opt.step(
            params, bf16(make_grads(make_params(np.float32), step, np.float32)), state
        )
    before = jax.tree.map(np.array, (params, state.slots))
    grads = make_grads(make_params(np.float32), 3, np.float32)
    grads["cube"][0, 0, 0] = np.nan
    params, state = opt.step(params, bf16(grads), state)
    after = jax.tree.map(np.array, (params, state.slots))
    for key in ("total_notfinite",):
        assert before[1].pop(key) == 0 and after[1].pop(key) == 1
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_use_ema_average_and_finalize_follow_keras_rule(x64):
    """ema = p after the first update, then m * ema + (1 - m) * p; finalize returns it."""
    m = 0.9
    opt = optgen.load("adam", **HYPERS, use_ema=True, ema_momentum=m)
    plain = optgen.load("adam", **HYPERS)
    shapes = make_params(np.float64)
    params = jax.tree.map(jnp.asarray, shapes)
    ours, reference = (
        (params, opt.init(params)),
        (jax.tree.map(jnp.array, params), plain.init(params)),
    )
    average = None
    for step in range(STEPS):
        grads = make_grads(shapes, step, np.float64)
        ours = opt.step(*ours[:1], grads, ours[1])
        reference = plain.step(reference[0], grads, reference[1])
        p = jax.tree.map(np.asarray, reference[0])
        average = (
            p if average is None else jax.tree.map(lambda a, x: m * a + (1 - m) * x, average, p)
        )
    assert_trees_close(ours[0], reference[0], 0)
    assert_trees_close(opt.finalize(*ours), average, 1e-12)
    assert plain.finalize(reference[0], reference[1]) is reference[0]


SCHEDULES = {
    "constant": (optgen.schedules.constant(0.01), optax.constant_schedule(0.01)),
    "cosine_decay": (
        optgen.schedules.cosine_decay(0.01, 30, alpha=0.1),
        optax.cosine_decay_schedule(0.01, 30, alpha=0.1),
    ),
    "warmup_cosine_decay": (
        optgen.schedules.warmup_cosine_decay(0.0, 0.01, 5, 30, end_value=1e-4),
        optax.warmup_cosine_decay_schedule(0.0, 0.01, 5, 30, end_value=1e-4),
    ),
    "exponential_decay": (
        optgen.schedules.exponential_decay(0.01, 4, 0.8, transition_begin=3, staircase=True),
        optax.exponential_decay(0.01, 4, 0.8, transition_begin=3, staircase=True),
    ),
    "piecewise_constant": (
        optgen.schedules.piecewise_constant(0.01, {5: 0.5, 20: 0.1}),
        optax.piecewise_constant_schedule(0.01, {5: 0.5, 20: 0.1}),
    ),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_named_schedule_matches_optax(name, x64):
    ours, theirs = SCHEDULES[name]
    counts = jnp.arange(60)
    np.testing.assert_array_equal(jax.vmap(ours)(counts), jax.vmap(theirs)(counts))
    want, _ = _run(optax.adamw(theirs, b1=0.8), path="update", jit=True)
    got, _ = _run(optgen.load("adamw", learning_rate=ours, b1=0.8))
    assert_trees_close(got, want, 1e-9)


# -- configuration ---------------------------------------------------------------------------


def test_config_round_trips_through_json_and_gives_the_same_numbers():
    opt = optgen.load(
        "keras/adamw",
        learning_rate=optgen.schedules.warmup_cosine_decay(0.0, 1e-2, 5, 40),
        weight_decay=0.01,
        amsgrad=True,
        global_clipnorm=1.0,
        use_ema=True,
        gradient_accumulation_steps=2,
        exclude_from_weight_decay=["vector"],
        passes=["canon", "dce"],
    )
    config = json.loads(json.dumps(opt.get_config()))
    assert config["spec"] == "keras/adamw" and config["transforms"]["use_ema"] is True
    again = optgen.from_config(config)
    assert again.get_config() == config
    first, _ = _run(opt, dtype=np.float32)
    second, _ = _run(again, dtype=np.float32)
    assert_trees_close(second, first, 0)


def test_config_of_a_spec_file_checks_its_digest(tmp_path):
    path = tmp_path / "sgd.spec"
    path.write_text(
        "optimizer sgd\nhyper learning_rate = 0.1\nupdate:\n  p = p - learning_rate * g\n"
    )
    config = optgen.load(str(path), learning_rate=0.5).get_config()
    assert config["spec"] == str(path) and len(config["sha256"]) == 64
    assert optgen.from_config(config).hyperparams == {"learning_rate": 0.5}
    path.write_text(path.read_text().replace("0.1", "0.2"))
    with pytest.raises(optgen.SpecError, match="has changed since this config was written"):
        optgen.from_config(config)


def test_config_refuses_what_it_cannot_write_down():
    with pytest.raises(optgen.SpecError, match="'learning_rate': it is a Python callable"):
        optgen.load("adamw", learning_rate=lambda count: 1e-3).get_config()
    with pytest.raises(optgen.SpecError, match="cannot write down a mask"):
        optgen.load("adamw", mask=lambda params: params).get_config()


# -- mistakes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"clipnorm": -1.0}, "clipnorm takes a finite positive number"),
        (
            {"clipnorm": 1.0, "global_clipnorm": 1.0},
            "only one of clipnorm, clipvalue and global_clipnorm",
        ),
        ({"gradient_accumulation_steps": 1}, "an integer >= 2"),
        ({"use_ema": "yes"}, "use_ema takes true or false"),
        ({"ema_momentum": 0.5}, "need use_ema=True"),
        ({"use_ema": True, "ema_momentum": 2.0}, r"in \[0, 1\]"),
        ({"exclude_from_weight_decay": [1]}, "name fragments"),
        ({"clipnrm": 1.0}, "did you mean 'clipnorm'"),
    ],
)
def test_bad_option_values_are_diagnostics(kwargs, message):
    with pytest.raises(optgen.Diagnostic, match=message):
        optgen.load("adamw", **kwargs)


def test_masking_a_spec_without_weight_decay_is_a_spec_error():
    with pytest.raises(
        optgen.SpecError, match="'adam' has no hyperparameter 'weight_decay' to mask"
    ):
        optgen.load("adam", exclude_from_weight_decay=["bias"])


def test_mask_of_the_wrong_structure_is_a_spec_error():
    opt = optgen.load("adamw", mask={"w": True})
    params = {"w": jnp.ones(3), "b": jnp.ones(2)}
    with pytest.raises(
        optgen.SpecError, match="mask does not have the structure of the parameters"
    ):
        opt.step(params, params, opt.init(params))


def test_transform_state_that_clashes_with_a_spec_state_is_a_spec_error(tmp_path):
    path = tmp_path / "x.spec"
    path.write_text("optimizer x\nstate ema = 0\nupdate:\n  ema = g\n  p = p - 0.1 * ema\n")
    with pytest.raises(
        optgen.SpecError, match="use_ema adds 'ema', but the spec already has a 'ema'"
    ):
        optgen.load(str(path), use_ema=True)


def test_state_of_transforms_is_a_pytree_of_arrays():
    opt = optgen.load("adamw", use_ema=True, skip_nonfinite=True, gradient_accumulation_steps=2)
    state = opt.init({"w": jnp.ones(3)})
    assert set(state.slots) == {"mu", "nu", "ema", "grad_accumulator", "total_notfinite"}
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))


def test_optax_update_protocol_gives_the_numbers_of_step():
    """update (optax's protocol, returning p_new - p) and the fused step agree with every kind of
    transform on.
    """
    opt = optgen.load(
        "adamw",
        clipnorm=1.0,
        use_ema=True,
        ema_overwrite_frequency=3,
        skip_nonfinite=True,
        gradient_accumulation_steps=2,
        loss_scale_factor=2.0,
        exclude_from_weight_decay=["cube"],
    )
    via_step, step_state = _run(opt, dtype=np.float32, steps=12, grads_at=_grads_with_nonfinite)

    via_update, update_state = _run(
        opt, "update", dtype=np.float32, steps=12, grads_at=_grads_with_nonfinite
    )
    assert_trees_close(via_update, via_step, 1e-6)
    assert_trees_close(update_state.slots, step_state.slots, 1e-6)


def test_an_exclude_pattern_that_does_not_compile_is_refused_at_load():
    with pytest.raises(optgen.SpecError, match=r"E342.*'bias\(' is not a valid pattern"):
        optgen.load("adamw", exclude_from_weight_decay=["norm", "bias("])


def test_every_transform_declares_its_options():
    from optgen.transforms import DEFAULTS, HYPER_RANGES, OPTIONS, TRANSFORMS

    declared = [option.name for module in TRANSFORMS for option in module.OPTIONS]
    assert sorted(declared) == sorted(OPTIONS) == sorted(DEFAULTS) and len(set(declared)) == len(
        declared
    )
    for module in TRANSFORMS:
        assert callable(module.enabled) and callable(module.apply), module.__name__
    assert set(HYPER_RANGES) == {
        "clipnorm",
        "global_clipnorm",
        "clipvalue",
        "ema_momentum",
        "ema_overwrite_frequency",
        "loss_scale_factor",
        "gradient_accumulation_steps",
    }


def test_an_option_hyperparameter_changed_out_of_range_in_the_state_is_refused():
    # clipnorm = inf computes g * inf / inf: nan in every parameter
    opt = optgen.load("adamw", clipnorm=1.0)
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    state.hyperparams["clipnorm"] = float("inf")
    with pytest.raises(optgen.InputError) as err:
        opt.step(params, {"w": jnp.ones(3)}, state)
    assert err.value.code == "E306" and "clipnorm" in err.value.message
