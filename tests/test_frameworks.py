"""kernels/keras/* against Keras 3 and kernels/torch/* against torch.optim, step by step, with every
option.

Keras and torch are optional (the ``conformance`` extra); without them these tests
skip and say why. Keras runs on its JAX backend (``KERAS_BACKEND=jax``, set here
before it is imported).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import as_jax, assert_trees_close, make_grads, make_params, run_steps

import optgen
from optgen.transforms.decay_mask import key_path_name

STEPS = 40
# torch.optim.Muon against optgen's bf16_newton_schulz after 150 steps: measured 8.3e-7 at most;
# Newton-Schulz in float32 instead: 1.5e-4 to 7.3e-4
BF16_MUON_TOLERANCE = 5e-6


def _leaves(params):
    with_paths, _ = jax.tree_util.tree_flatten_with_path(params)
    return [key_path_name(path) for path, _ in with_paths], [np.asarray(x) for _, x in with_paths]


def _run_optgen(spec, settings, dtype, grad_scale=1.0):
    opt = optgen.load(spec, **settings)

    # drawn in make_params's key order, as the Keras and torch runs draw them
    def grads_at(params, step):
        return jax.tree.map(lambda g: g * grad_scale, make_grads(make_params(dtype), step, dtype))

    params, state = run_steps(
        opt, as_jax(make_params(dtype)), STEPS, path="step", grads_at=grads_at
    )
    return _leaves(params)[1], _leaves(opt.finalize(params, state))[1]


# -- Keras -----------------------------------------------------------------------------------

KERAS_HYPERS = {
    "learning_rate": 3e-3,
    "weight_decay": 0.05,
    "beta_1": 0.8,
    "beta_2": 0.99,
    "epsilon": 1e-6,
}
KERAS_CASES = {
    "defaults": {},
    "amsgrad": {"amsgrad": True},
    "clipnorm": {"clipnorm": 1.0},
    "clipvalue": {"clipvalue": 0.5},
    "global_clipnorm": {"global_clipnorm": 1.0},
    "use_ema": {"use_ema": True, "ema_momentum": 0.9},
    "ema_overwrite_frequency": {"use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 7},
    "gradient_accumulation_steps": {"gradient_accumulation_steps": 3},
    "loss_scale_factor": {"loss_scale_factor": 128.0},
    "exclude_from_weight_decay": {"exclude_from_weight_decay": ["vector", "huge"]},
    "schedule": {"learning_rate": "cosine"},
    "all_at_once": {
        "gradient_accumulation_steps": 2,
        "clipnorm": 0.5,
        "use_ema": True,
        "ema_momentum": 0.8,
        "loss_scale_factor": 4.0,
        "exclude_from_weight_decay": ["cube"],
    },
}
KERAS_CLASSES = {"keras/adamw": "AdamW", "keras/adamax": "Adamax"}


def _keras():
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras = pytest.importorskip(
        "keras", reason="keras is not installed (pip install -e '.[conformance]')"
    )
    if keras.backend.backend() != "jax":
        pytest.skip(
            f"keras runs on its {keras.backend.backend()} backend here; these tests need "
            "KERAS_BACKEND=jax"
        )
    return keras


def _run_keras(keras, cls, settings, grad_scale):
    settings = dict(settings)
    exclude = settings.pop("exclude_from_weight_decay", None)
    if settings.get("learning_rate") == "cosine":
        settings["learning_rate"] = keras.optimizers.schedules.CosineDecay(3e-3, 30, alpha=0.1)
    names, values = _leaves(make_params(np.float32))
    variables = [
        keras.Variable(v, name=n.replace("/", "_")) for n, v in zip(names, values, strict=True)
    ]
    opt = getattr(keras.optimizers, cls)(**settings)
    if exclude:
        opt.exclude_from_weight_decay(var_names=exclude)
    opt.build(variables)
    # Keras's own jitted training path: stateless_apply, as model.fit runs it on JAX.
    apply = jax.jit(opt.stateless_apply)
    values, slots = [v.value for v in variables], [v.value for v in opt.variables]
    params = make_params(np.float32)
    for step in range(STEPS):
        grads = _leaves(make_grads(params, step, np.float32))[1]
        values, slots = apply(slots, [jnp.asarray(g * grad_scale) for g in grads], values)
    for variable, value in zip([*variables, *opt.variables], [*values, *slots], strict=True):
        variable.assign(value)
    before = [np.asarray(v.value) for v in variables]
    opt.finalize_variable_values(variables)
    return before, [np.asarray(v.value) for v in variables]


@pytest.mark.parametrize("case", sorted(KERAS_CASES))
@pytest.mark.parametrize("spec", sorted(KERAS_CLASSES))
def test_keras_spec_matches_keras(spec, case):
    keras = _keras()
    if case == "amsgrad" and spec != "keras/adamw":
        pytest.skip("Keras's Adamax has no amsgrad")
    settings = KERAS_HYPERS | KERAS_CASES[case]
    scale = settings.get("loss_scale_factor", 1.0)
    want, want_final = _run_keras(keras, KERAS_CLASSES[spec], settings, scale)
    ours = dict(settings)
    if ours.get("learning_rate") == "cosine":
        ours["learning_rate"] = optgen.schedules.cosine_decay(3e-3, 30, alpha=0.1)
    got, got_final = _run_optgen(spec, ours, np.float32, scale)
    assert_trees_close(got, want, 1e-4, same_dtype=True)
    assert_trees_close(got_final, want_final, 1e-4, same_dtype=True)


@pytest.mark.parametrize("spec", sorted(KERAS_CLASSES))
def test_keras_spec_defaults_are_keras_defaults(spec):
    import inspect

    keras = _keras()
    signature = inspect.signature(getattr(keras.optimizers, KERAS_CLASSES[spec]))
    for name, default in optgen.load(spec).hyperparams.items():
        reference = signature.parameters[name].default
        assert default == (0.0 if reference is None else reference), name
    if spec == "keras/adamw":
        assert optgen.check_spec(spec).options == {
            "amsgrad": signature.parameters["amsgrad"].default
        }


# -- torch -----------------------------------------------------------------------------------

TORCH_HYPERS = {"lr": 3e-3, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.05}
TORCH_CASES = {
    "defaults": {},
    "amsgrad": {"amsgrad": True},
    "global_clipnorm": {"global_clipnorm": 1.0},
    "clipvalue": {"clipvalue": 0.5},
    # torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn, updated after each step
    "use_ema": {"use_ema": True, "ema_momentum": 0.9},
    # torch.optim.lr_scheduler.ExponentialLR, stepped after each step
    "schedule": {"lr": "exponential"},
}
# spec -> (torch.optim class, the constructor arguments that select the spec's variant)
TORCH_CLASSES = {
    "torch/adamw": ("AdamW", {}),
    "torch/adamax": ("Adamax", {}),
    "torch/nadamw": ("NAdam", {"decoupled_weight_decay": True}),
}


def _run_torch(torch, torch_class, settings, dtype):
    from torch.optim import lr_scheduler, swa_utils

    settings = dict(settings)
    clipnorm, clipvalue = settings.pop("global_clipnorm", None), settings.pop("clipvalue", None)
    ema_momentum = settings.pop("ema_momentum", None) if settings.pop("use_ema", False) else None
    exponential = settings["lr"] == "exponential"
    settings["lr"] = 3e-3 if exponential else settings["lr"]
    settings["betas"] = (settings.pop("beta1"), settings.pop("beta2"))
    model = torch.nn.Module()
    model.params = torch.nn.ParameterList(
        [torch.nn.Parameter(torch.tensor(v)) for v in _leaves(make_params(dtype))[1]]
    )
    tensors = list(model.params)
    name, variant = torch_class
    opt = getattr(torch.optim, name)(tensors, foreach=False, **variant, **settings)
    scheduler = lr_scheduler.ExponentialLR(opt, gamma=0.95) if exponential else None
    average = (
        None
        if ema_momentum is None
        else swa_utils.AveragedModel(
            model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(ema_momentum)
        )
    )
    params = make_params(dtype)
    for step in range(STEPS):
        for tensor, grad in zip(tensors, _leaves(make_grads(params, step, dtype))[1], strict=True):
            tensor.grad = torch.tensor(grad)
        if clipnorm is not None:
            torch.nn.utils.clip_grad_norm_(tensors, clipnorm, foreach=False)
        if clipvalue is not None:
            torch.nn.utils.clip_grad_value_(tensors, clipvalue, foreach=False)
        opt.step()
        if scheduler is not None:
            scheduler.step()
        if average is not None:
            average.update_parameters(model)
    final = tensors if average is None else list(average.module.params)
    return [t.detach().numpy() for t in tensors], [t.detach().numpy() for t in final]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", sorted(TORCH_CASES))
@pytest.mark.parametrize("spec", sorted(TORCH_CLASSES))
def test_torch_spec_matches_torch(spec, case, dtype):
    torch = pytest.importorskip(
        "torch", reason="torch is not installed (pip install -e '.[conformance]')"
    )
    if case == "amsgrad" and spec != "torch/adamw":
        pytest.skip(f"torch's {TORCH_CLASSES[spec][0]} has no amsgrad")
    settings = TORCH_HYPERS | TORCH_CASES[case]
    want, want_final = _run_torch(torch, TORCH_CLASSES[spec], settings, dtype)
    ours = dict(settings)
    if ours["lr"] == "exponential" and dtype == np.float32:
        ours["lr"] = optgen.schedules.exponential_decay(3e-3, 1, 0.95)
    elif ours["lr"] == "exponential":
        # optax's exponential_decay is float32 for an int32 count; this is float64
        ours["lr"] = lambda count: 3e-3 * jnp.power(0.95, count.astype(jnp.float64))
    with jax.enable_x64(dtype == np.float64):
        got, got_final = _run_optgen(spec, ours, dtype)
    tolerance = 1e-9 if dtype == np.float64 else 1e-4
    assert_trees_close(got, want, tolerance, same_dtype=True)
    assert_trees_close(got_final, want_final, tolerance, same_dtype=True)


@pytest.mark.parametrize("spec", sorted(TORCH_CLASSES))
def test_torch_spec_defaults_are_torch_defaults(spec):
    import inspect

    torch = pytest.importorskip(
        "torch", reason="torch is not installed (pip install -e '.[conformance]')"
    )
    signature = inspect.signature(getattr(torch.optim, TORCH_CLASSES[spec][0]))
    betas = signature.parameters["betas"].default
    reference = {name: p.default for name, p in signature.parameters.items()} | {
        "beta1": betas[0],
        "beta2": betas[1],
    }
    for name, default in optgen.load(spec).hyperparams.items():
        assert default == reference[name], name


# -- torch.optim.Muon --------------------------------------------------------------------------

MUON_HYPERS = {"lr": 3e-3, "weight_decay": 0.05, "momentum": 0.9}
MUON_CASES = {
    "defaults": {},
    "plain": {"nesterov": False},
    "match_rms_adamw": {"match_rms_adamw": True},
    "3-steps": {"ns_steps": 3},
}
MUON_STEPS = 150


def _matrices(tree):
    """The 2-d leaves (torch.optim.Muon takes nothing else): the (5, 3) matrix and the
    (3, 2) one.
    """
    return {"matrix": tree["matrix"], "huge_grad": tree["huge_grad"]}


def _run_torch_muon(torch, settings, dtype):
    settings = dict(settings)
    settings.pop("bf16_newton_schulz", None)  # optgen's own: torch's is its monkeypatched bfloat16
    if settings.pop("match_rms_adamw", False):
        settings["adjust_lr_fn"] = "match_rms_adamw"
    tensors = [
        torch.nn.Parameter(torch.tensor(v)) for v in _leaves(_matrices(make_params(dtype)))[1]
    ]
    opt = torch.optim.Muon(tensors, **settings)
    params = make_params(dtype)
    for step in range(MUON_STEPS):
        for tensor, grad in zip(
            tensors, _leaves(_matrices(make_grads(params, step, dtype)))[1], strict=True
        ):
            tensor.grad = torch.tensor(grad)
        opt.step()
    return [t.detach().numpy() for t in tensors]


def _run_optgen_muon(settings, dtype):
    opt = optgen.load("torch/muon", **settings)
    params, _ = run_steps(
        opt,
        as_jax(_matrices(make_params(dtype))),
        MUON_STEPS,
        path="step",
        grads_at=lambda p, step: _matrices(make_grads(make_params(dtype), step, dtype)),
    )
    return _leaves(params)[1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", sorted(MUON_CASES))
def test_torch_muon_matches_torch_with_newton_schulz_in_the_parameters_dtype(
    case, dtype, monkeypatch
):
    """torch runs Newton-Schulz in bfloat16 (grad.bfloat16()); here it runs in the parameters'
    dtype, as optgen does, so the two algorithms are compared to the usual tolerances."""
    torch = pytest.importorskip(
        "torch", reason="torch is not installed (pip install -e '.[conformance]')"
    )
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda self: self.clone())
    settings = MUON_HYPERS | MUON_CASES[case] | {"bf16_newton_schulz": False}
    want = _run_torch_muon(torch, settings, dtype)
    with jax.enable_x64(dtype == np.float64):
        got = _run_optgen_muon(settings, dtype)
    assert_trees_close(got, want, 1e-9 if dtype == np.float64 else 2e-4, same_dtype=True)


@pytest.mark.parametrize("case", sorted(MUON_CASES))
def test_torch_muon_matches_torch_in_bfloat16(case):
    """Unpatched, torch runs Newton-Schulz in bfloat16, as optgen's bf16_newton_schulz (its
    default) does, through MKL's GEMM where it is installed: a product's sums in another order,
    and each value rounded where torch rounds it."""
    torch = pytest.importorskip(
        "torch", reason="torch is not installed (pip install -e '.[conformance]')"
    )
    settings = MUON_HYPERS | MUON_CASES[case]
    want = _run_torch_muon(torch, settings, np.float32)
    assert_trees_close(_run_optgen_muon(settings, np.float32), want, BF16_MUON_TOLERANCE)
    with pytest.raises(AssertionError):  # Newton-Schulz in float32 is further from torch's
        f32 = _run_optgen_muon(settings | {"bf16_newton_schulz": False}, np.float32)
        assert_trees_close(f32, want, BF16_MUON_TOLERANCE)


def test_torch_muon_defaults_are_torch_defaults():
    import inspect

    torch = pytest.importorskip(
        "torch", reason="torch is not installed (pip install -e '.[conformance]')"
    )
    reference = {
        name: p.default for name, p in inspect.signature(torch.optim.Muon).parameters.items()
    }
    a, b, c = reference.pop("ns_coefficients")
    reference |= {"ns_a": a, "ns_b": b, "ns_c": c}
    checked = optgen.check_spec("torch/muon")
    for name, default in optgen.load("torch/muon").hyperparams.items():
        assert default == reference[name], name
    assert (
        checked.options["nesterov"] is reference["nesterov"]
        and checked.options["ns_steps"] == reference["ns_steps"]
    )
    assert checked.options["match_rms_adamw"] is (reference["adjust_lr_fn"] == "match_rms_adamw")
