"""Each built-in spec against its optax (or optax.contrib) counterpart, or a float64 NumPy reference
of its paper's rule where optax has none: 150 steps, mixed shapes, f64 and f32."""

from __future__ import annotations

import inspect

import jax
import numpy as np
import optax
import pytest
from conftest import as_jax, assert_trees_close, make_grads, make_params, rel_err, run_steps

import optgen

# Each case runs a built-in spec with some options against the optax (or optax.contrib) function of
# the same name, given the same hyperparameters and the options optax also takes; optgen's option
# `use_X = false` is optax's `X=None`, unless optax takes `use_X` itself (adopt's use_clipping).
CASES = {
    "adam": ("adam", {}),
    "adamw": ("adamw", {}),
    "adamax": ("adamax", {}),
    "amsgrad": ("amsgrad", {}),
    "nadamw": ("nadamw", {}),
    "nadam": ("nadam", {}),
    "sgd": ("sgd", {}),
    "sgd-momentum": ("sgd", {"use_momentum": True}),
    "sgd-nesterov": ("sgd", {"use_momentum": True, "nesterov": True}),
    "rmsprop": ("rmsprop", {}),
    "rmsprop-centered-momentum": ("rmsprop", {"centered": True, "use_momentum": True}),
    "rmsprop-nesterov-eps-outside-corrected": (
        "rmsprop",
        {"use_momentum": True, "nesterov": True, "eps_in_sqrt": False, "bias_correction": True},
    ),
    # (centered with bias_correction is left out: at step 1 its variance is g^2 - g^2, pure
    # rounding noise, so no two orders of evaluation agree.)
    "adagrad": ("adagrad", {}),
    "adadelta": ("adadelta", {}),
    "radam": ("radam", {}),
    "radam-nesterov": ("radam", {"nesterov": True}),
    "adabelief": ("adabelief", {}),
    "adabelief-nesterov": ("adabelief", {"nesterov": True}),
    "yogi": ("yogi", {}),
    "lion": ("lion", {}),
    "adan": ("adan", {}),
    "lamb": ("lamb", {}),
    "lars": ("lars", {}),
    "lars-nesterov": ("lars", {"nesterov": True}),
    "novograd": ("novograd", {}),
    # Factors the matrix (5, 3) and the cube (2, 3, 4) (rows along axis 1, a batch along axis 0);
    # the scalar, the vectors and the (3, 2) leaf fall back to unfactored.
    "adafactor": ("adafactor", {"min_dim_size_to_factor": 3}),
    "adafactor-decay-unclipped-unscaled": (
        "adafactor",
        {
            "min_dim_size_to_factor": 3,
            "use_weight_decay_rate": True,
            "use_clipping_threshold": False,
            "multiply_by_parameter_scale": False,
        },
    ),
    "adafactor-momentum": ("adafactor", {"min_dim_size_to_factor": 3, "use_momentum": True}),
    "adafactor-unfactored": ("adafactor", {"factored": False}),
    "adopt": ("adopt", {}),
    "adopt-nesterov-unclipped": ("adopt", {"nesterov": True, "use_clipping": False}),
    "ademamix": ("ademamix", {}),
    # Newton-Schulz on the 2-d leaves (the (5, 3) matrix transposed, the (3, 2) one as it is);
    # optax's AdamW (Nesterov by default) on the scalar, the vectors and the cube.
    "muon": ("muon", {}),
    "muon-plain-adam-lr": ("muon", {"nesterov": False, "use_adam_learning_rate": True}),
    "muon-3-steps": ("muon", {"ns_steps": 3}),
    "schedule_free_adamw": ("schedule_free_adamw", {}),
    "schedule_free_adamw-warmup": ("schedule_free_adamw", {"use_warmup_steps": True}),
    "prodigy": ("prodigy", {}),
    "prodigy-safeguard-beta3": ("prodigy", {"safeguard_warmup": True, "use_beta3": True}),
}
SPECS = sorted({spec for spec, _ in CASES.values()})
# Adafactor keeps its momentum in float32 (optax's dtype_momentum), so in a float64 run both
# sides round it to float32, and a value on a rounding boundary may go either way: float32 only.
FLOAT32_ONLY = {"adafactor-momentum"}
# Every spec runs through both paths; its option variants only through one per dtype.
PATHS = {
    (case, dtype, path)
    for case, (spec, options) in CASES.items()
    for dtype in ("f64", "f32")
    for path in ("update", "step")
    if not options or (dtype, path) in (("f64", "update"), ("f32", "step"))
    if not (case in FLOAT32_ONLY and dtype == "f64")
}
# Non-default values, so a hyperparameter wired to the wrong place shows.
CUSTOM = {
    "learning_rate": 3e-3,
    "b1": 0.8,
    "b2": 0.99,
    "b3": 0.95,
    "eps": 1e-6,
    "eps_root": 1e-10,
    "weight_decay": 1e-2,
    "momentum": 0.7,
    "decay": 0.85,
    "initial_scale": 0.1,
    "initial_accumulator_value": 0.2,
    "rho": 0.8,
    "threshold": 6.0,
    "trust_coefficient": 0.02,
    "decay_rate": 0.7,
    "clipping_threshold": 0.9,
    "weight_decay_rate": 1e-3,
    "alpha": 4.0,
    "beta": 0.9,
    "beta1": 0.85,
    "beta2": 0.99,
    "beta3": 0.98,
    "estim_lr0": 1e-5,
    "adam_b1": 0.85,
    "adam_b2": 0.99,
    "adam_weight_decay": 2e-3,
    "adam_learning_rate": 2e-3,
}
STEPS = 150
# LAMB's steps are learning_rate * ||p|| per tensor: about bfloat16's half-ulp of p, so
# rounding on store moves bfloat16 parameters further from float32 ones.
BF16_TOLERANCE = {"lamb": 5e-2}
TOLERANCE = {np.float64: 1e-9, np.float32: 2e-4}


def _reference(spec):
    return getattr(optax, spec, None) or getattr(optax.contrib, spec)


def _optax_name(option, parameters):
    """The reference's name for a spec option: its own, or X for use_X."""
    return option if option in parameters else option.removeprefix("use_")


# Hyperparameters that are one entry of a reference's tuple: name -> (tuple argument, index).
COMPONENTS = {
    "ns_a": ("ns_coeffs", 0),
    "ns_b": ("ns_coeffs", 1),
    "ns_c": ("ns_coeffs", 2),
    "beta1": ("betas", 0),
    "beta2": ("betas", 1),
}


def _hypers(spec):
    return {k: v for k, v in CUSTOM.items() if k in optgen.load(spec).hyperparams}


def _optax_kwargs(case):
    spec, options = CASES[case]
    accepted = inspect.signature(_reference(spec)).parameters
    kwargs = {k: v for k, v in (_hypers(spec) | options).items() if k in accepted}
    for name, value in _hypers(spec).items():
        if name in COMPONENTS:
            argument, index = COMPONENTS[name]
            entries = list(kwargs.get(argument, accepted[argument].default))
            entries[index] = value
            kwargs[argument] = tuple(entries)
    for option, default in optgen.check_spec(spec).options.items():
        name = _optax_name(option, accepted)
        if option == name:
            continue
        if option.startswith("use_") and not options.get(option, default):
            kwargs[name] = None
        elif option.startswith("use_") and name not in kwargs:  # on, at the spec's default value
            kwargs[name] = optgen.check_spec(spec).hypers[name]
    return kwargs


@pytest.fixture(autouse=True)
def _adafactor_decay_in_float64(monkeypatch):
    """optax computes Adafactor's decay schedule 1 - t^-decay_rate in float32 even under x64
    (t = jnp.array(count + 1, jnp.float32)); compare the algorithm, in the parameters' dtype."""
    from optax._src import factorized

    defaults = list(factorized.scale_by_factored_rms.__defaults__)

    def decay(count, exponent=0.8):  # float32 unless x64 is on (checked when traced)
        return 1.0 - jax.numpy.asarray(count + 1, jax.dtypes.canonicalize_dtype(np.float64)) ** (
            -exponent
        )

    defaults[-1] = decay
    monkeypatch.setattr(factorized.scale_by_factored_rms, "__defaults__", tuple(defaults))


@pytest.fixture(autouse=True)
def _warmup_in_float64(monkeypatch):
    """optax's warmup_constant_schedule computes in float32 (of an int32 count) even under x64;
    compare Schedule-Free's algorithm in the parameters' dtype."""
    from optax.contrib import _schedule_free

    def warmup_constant_schedule(init_value, peak_value, warmup_steps):
        def schedule(count):
            count = jax.numpy.asarray(count, jax.dtypes.canonicalize_dtype(np.float64))
            return (
                init_value
                + (peak_value - init_value) * jax.numpy.minimum(count, warmup_steps) / warmup_steps
            )

        return schedule

    monkeypatch.setattr(
        _schedule_free._schedule, "warmup_constant_schedule", warmup_constant_schedule
    )


def _compare(case, dtype, path):
    spec, options = CASES[case]
    tx = _reference(spec)(**_optax_kwargs(case))
    expected, _ = run_steps(tx, as_jax(make_params(dtype)), STEPS, jit=True)
    got, _ = run_steps(
        optgen.load(spec, **_hypers(spec), **options), as_jax(make_params(dtype)), STEPS, path=path
    )
    assert_trees_close(got, expected, TOLERANCE[dtype], dtype=dtype)


@pytest.mark.parametrize(("case", "path"), sorted((c, p) for c, d, p in PATHS if d == "f64"))
def test_matches_optax_float64(case, path, x64):
    _compare(case, np.float64, path)


@pytest.mark.parametrize(("case", "path"), sorted((c, p) for c, d, p in PATHS if d == "f32"))
def test_matches_optax_float32(case, path):
    _compare(case, np.float32, path)


def _cautious_adamw(params, grads, slots, t, h):
    """Cautious AdamW, Liang et al. (2024), Algorithm 1: AdamW's step u, kept where u * g > 0 and
    scaled by d / (nnz + 1) per tensor of d elements; decoupled weight decay as optax.adamw's."""
    mu = h["b1"] * slots["mu"] + (1 - h["b1"]) * grads
    nu = h["b2"] * slots["nu"] + (1 - h["b2"]) * grads * grads
    u = (mu / (1 - h["b1"] ** t)) / (np.sqrt(nu / (1 - h["b2"] ** t) + h["eps_root"]) + h["eps"])
    phi = (u * grads > 0).astype(params.dtype)
    scale = params.size / (phi.sum() + 1)
    return params - h["learning_rate"] * (u * phi * scale + h["weight_decay"] * params), {
        "mu": mu,
        "nu": nu,
    }


def _inverse_fourth_root(a, eps):
    """a^-1/4 of a symmetric matrix a = L + eps I, L positive semidefinite, by its
    eigendecomposition (float64). Its eigenvalues are at least eps, but rounding can put the
    smallest below, even below zero (a rank-2 L of norm 1e12 beside eps = 1e-4, on OpenBLAS's
    AVX2 kernels), so they are clipped at eps."""
    w, v = np.linalg.eigh(a)
    return (v * np.maximum(w, eps) ** -0.25) @ v.T


def _shampoo(params, grads, slots, t, h):
    """Shampoo, Gupta et al. (2018), Algorithm 1 (a matrix): L += g g^T, R += g^T g, both from
    eps * I, p -= lr L^-1/4 g R^-1/4, the roots exact (eigh), in float64; diagonal AdaGrad
    (sum of g^2 from 0, eps inside the root) for parameters of other ranks. States start empty."""
    g, lr, eps = grads.astype(np.float64), h["learning_rate"], float(h["eps"])
    if params.ndim != 2:
        acc = slots.get("acc", 0.0) + g * g
        return (params - lr * g / np.sqrt(acc + eps)).astype(params.dtype), slots | {"acc": acc}
    left, right = slots.get("L", 0.0) + g @ g.T, slots.get("R", 0.0) + g.T @ g
    step = (
        _inverse_fourth_root(left + eps * np.eye(len(left)), eps)
        @ g
        @ _inverse_fourth_root(right + eps * np.eye(len(right)), eps)
    )
    return (params - lr * step).astype(params.dtype), slots | {"L": left, "R": right}


# Specs optax lacks, against a NumPy transcription of their paper's rule: (step function, the states
# it starts with at zero).
NUMPY_REFERENCES = {"cautious_adamw": (_cautious_adamw, ("mu", "nu")), "shampoo": (_shampoo, ())}


def _run_numpy(spec, dtype):
    step_fn, names = NUMPY_REFERENCES[spec]
    h = {k: dtype(v) for k, v in optgen.check_spec(spec).hypers.items()} | {
        k: dtype(v) for k, v in _hypers(spec).items()
    }
    leaves, treedef = jax.tree.flatten(make_params(dtype))
    slots = [{name: np.zeros_like(x) for name in names} for x in leaves]
    with np.errstate(all="ignore"):
        for step in range(STEPS):
            grads = treedef.flatten_up_to(make_grads(treedef.unflatten(leaves), step, dtype))
            out = [
                step_fn(p, g, s, dtype(step + 1), h)
                for p, g, s in zip(leaves, grads, slots, strict=True)
            ]
            leaves, slots = [p for p, _ in out], [s for _, s in out]
    return treedef.unflatten(leaves)


@pytest.mark.parametrize("path", ["update", "step"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("spec", sorted(NUMPY_REFERENCES))
def test_matches_numpy_reference(spec, dtype, path):
    with jax.enable_x64(dtype == np.float64):
        got, _ = run_steps(
            optgen.load(spec, **_hypers(spec)), as_jax(make_params(dtype)), STEPS, path=path
        )
    assert_trees_close(got, _run_numpy(spec, dtype), TOLERANCE[dtype], dtype=dtype)


@pytest.mark.parametrize("spec", SPECS)
def test_defaults_match_optax(spec):
    """Hyperparameter and option defaults are optax's; optax's None is an option use_X = false
    (or, for a learning rate, no scaling: 1.0)."""
    parameters = inspect.signature(_reference(spec)).parameters
    checked = optgen.check_spec(spec)
    options = {k: v for k, v in checked.options.items() if _optax_name(k, parameters) in parameters}
    for name, default in (checked.hypers | options).items():  # amsgrad has options optax lacks
        if name in COMPONENTS:
            argument, index = COMPONENTS[name]
            assert default == parameters[argument].default[index], name
            continue
        reference = parameters[_optax_name(name, parameters)].default
        if name.startswith("use_") and name not in parameters:
            assert default is (reference is not None), name
        elif reference is None and f"use_{name}" in checked.options:
            continue  # the value taken when the option is turned on
        elif reference is None:
            assert (name, default) == ("learning_rate", 1.0), name
        elif reference is not inspect.Parameter.empty:  # optax has no default learning rate
            assert default == reference, name


@pytest.mark.parametrize("spec", SPECS + sorted(NUMPY_REFERENCES))
def test_bfloat16_params_keep_dtype_and_track_float32(spec):
    import ml_dtypes

    def bf16(tree):
        return jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), tree)

    opt = optgen.load(spec, **_hypers(spec))
    p32, _ = run_steps(opt, as_jax(make_params(np.float32)), 20, path="step")
    p16, s16 = run_steps(
        opt,
        bf16(as_jax(make_params(np.float32))),
        20,
        path="step",
        grads_at=lambda p, step: bf16(make_grads(p, step, np.float32)),
    )
    assert all(a.dtype == ml_dtypes.bfloat16 for a in jax.tree.leaves(p16))
    assert_trees_close(p16, p32, BF16_TOLERANCE.get(spec, 2e-2))
    # a per-step state (prodigy's d) keeps the step dtype
    extents = opt.compiled.program.state_extents
    assert all(
        x.dtype == ml_dtypes.bfloat16
        for name, slot in s16.slots.items()
        if extents[name] != "step"
        for x in jax.tree.leaves(slot)
    )


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_prodigy_distance_estimate_matches_optax(dtype):
    """Prodigy's d after 150 steps: its numerator <g, x0 - x> is a global_sum, with no cancellation
    trick. In float32 both optax's and optgen's d are 9.2% from float64's (the 1e6 gradients make
    the sum ill-conditioned); they agree with each other to 2e-7."""
    tx = optax.contrib.prodigy(learning_rate=1.0)
    with jax.enable_x64(dtype == np.float64):
        expected = float(run_steps(tx, as_jax(make_params(dtype)), STEPS, jit=True)[1].estim_lr)
        got = float(
            run_steps(optgen.load("prodigy"), as_jax(make_params(dtype)), STEPS, path="step")[
                1
            ].slots["estim_lr"]
        )
    assert abs(got - expected) <= (1e-12 if dtype == np.float64 else 1e-6) * expected


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("path", ["update", "step"])
def test_sm3_matches_optax_on_every_rank(dtype, path):
    """One statistic per slice of every axis (the spec's `axes` state), as optax.sm3 keeps one
    vector per axis: the mixed pytree plus a 4-d leaf with a size-1 axis. optax.sm3 fails on a 0-d
    parameter (IndexError); optgen's scalar is its only slice, so it moves as optax's (1,) vector.
    """

    def with_four(values, seed):
        four = np.random.default_rng(seed).normal(size=(3, 1, 4, 2)).astype(dtype)
        return values | {"four": four}

    def as_vector(values):
        return values | {"scalar": np.reshape(values["scalar"], (1,))}

    tx, opt = optax.sm3(3e-3, momentum=0.8), optgen.load("sm3", learning_rate=3e-3, momentum=0.8)
    with jax.enable_x64(dtype == np.float64):
        params = jax.tree.map(jax.numpy.asarray, with_four(make_params(dtype), 7))
        expected, got = as_vector(params), jax.tree.map(jax.numpy.copy, params)
        state, ours = tx.init(expected), opt.init(got)
        for step in range(STEPS):
            grads = with_four(make_grads(make_params(dtype), step, dtype), 2000 + step)
            updates, state = tx.update(as_vector(grads), state, expected)
            expected = optax.apply_updates(expected, updates)
            if path == "step":
                got, ours = opt.step(got, grads, ours)
            else:
                updates, ours = opt.update(grads, ours, got)
                got = optax.apply_updates(got, updates)
    assert jax.tree.structure(ours.slots["v"]) == jax.tree.structure(got)
    for (key, e), g, v, mu in zip(
        jax.tree_util.tree_leaves_with_path(expected),
        jax.tree.leaves(got),
        jax.tree.leaves(ours.slots["v"]),
        jax.tree.leaves(state[0].mu, is_leaf=_is_list),
        strict=True,
    ):
        assert g.dtype == e.dtype == dtype, key
        assert rel_err(g, np.reshape(e, g.shape)) <= TOLERANCE[dtype], (
            key,
            rel_err(g, np.reshape(e, g.shape)),
        )
        # The statistics are optax's per-axis vectors end to end.
        assert rel_err(v, np.concatenate(mu)) <= TOLERANCE[dtype], key
    assert rel_err(got["cube"], params["cube"]) > 1e-3  # it moved


def _is_list(x):
    return isinstance(x, list)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("warmup", [None, 20])
def test_schedule_free_evaluation_point_matches_optax(warmup, dtype):
    """opt.outputs(params, state)["x"] (the spec's `output x`) against
    optax.contrib.schedule_free_eval_params.
    """
    settings = _hypers("schedule_free_adamw")
    tx = optax.contrib.schedule_free_adamw(**settings, warmup_steps=warmup)
    opt = optgen.load(
        "schedule_free_adamw",
        **settings,
        **({} if warmup is None else {"use_warmup_steps": True, "warmup_steps": warmup}),
    )
    with jax.enable_x64(dtype == np.float64):
        expected = optax.contrib.schedule_free_eval_params(
            *run_steps(tx, as_jax(make_params(dtype)), STEPS, jit=True)[::-1]
        )
        got = opt.outputs(*run_steps(opt, as_jax(make_params(dtype)), STEPS, path="step"))["x"]
    assert_trees_close(got, expected, TOLERANCE[dtype], dtype=dtype)


def _hessian(step, dtype):
    """A caller's positive Hessian-diagonal estimate for one step."""
    return jax.tree.map(
        lambda g: np.abs(g) + dtype(0.1), make_grads(make_params(dtype), 500 + step, dtype)
    )


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("path", ["update", "step"])
@pytest.mark.parametrize("clip", [True, False], ids=["clipped", "unclipped"])
def test_sophia_with_a_callers_hessian_matches_optax(clip, path, dtype):
    """The spec's `input hessian` arrives as update(..., hessian=h), as optax's sophia hands extra
    arguments to its hessian_diagonal_fn (here one that returns the caller's estimate)."""
    settings = {
        "learning_rate": 3e-3,
        "b1": 0.8,
        "b2": 0.99,
        "weight_decay": 1e-2,
        "eps": 1e-6,
        "update_interval": 3,
    }
    given = optax.GradientTransformationExtraArgs(
        lambda params: optax.EmptyState(), lambda g, s, params=None, hessian=None: (hessian, s)
    )
    tx = optax.contrib.sophia(
        **settings, hessian_diagonal_fn=given, clip_threshold=0.5 if clip else None
    )
    opt = optgen.load("sophia", **settings, use_clip_threshold=clip, clip_threshold=0.5)
    inputs = {
        "grads_at": lambda params, step: make_grads(make_params(dtype), step, dtype),
        "inputs_at": lambda step: {"hessian": _hessian(step, dtype)},
    }
    with jax.enable_x64(dtype == np.float64):
        # optax jitted: eagerly it took ~30 s a case
        expected, _ = run_steps(tx, as_jax(make_params(dtype)), STEPS, jit=True, **inputs)
        got, _ = run_steps(opt, as_jax(make_params(dtype)), STEPS, path=path, **inputs)
    assert_trees_close(got, expected, TOLERANCE[dtype], dtype=dtype)


def test_sophia_defaults_match_optax():
    parameters = inspect.signature(optax.contrib.sophia).parameters
    checked = optgen.check_spec("sophia")
    for name, default in checked.hypers.items():
        if name != "learning_rate":  # optax has no default learning rate
            assert default == parameters[name].default, name
    assert checked.options["use_clip_threshold"] is (
        parameters["clip_threshold"].default is not None
    )
