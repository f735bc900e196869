"""optgen.keras.Optimizer in model.fit against Keras's own AdamW and Adamax, with every Keras
option.

Keras is optional (the ``conformance`` extra); without it these tests skip and say why.
Keras runs on its JAX backend (``KERAS_BACKEND=jax``, set in conftest.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_trees_close, rel_err

import optgen

keras = pytest.importorskip(
    "keras", reason="keras is not installed (pip install -e '.[conformance]')"
)
if keras.backend.backend() != "jax":
    pytest.skip(
        f"keras runs on its {keras.backend.backend()} backend here; these tests need "
        "KERAS_BACKEND=jax",
        allow_module_level=True,
    )

EPOCHS = 4
HYPERS = {
    "learning_rate": 3e-3,
    "weight_decay": 0.05,
    "beta_1": 0.8,
    "beta_2": 0.99,
    "epsilon": 1e-6,
}
# Keras's constructor arguments per case; "exclude" goes through
# exclude_from_weight_decay(var_names=...).
CASES = {
    "defaults": {},
    "amsgrad": {"amsgrad": True},
    "clipnorm": {"clipnorm": 0.1},
    "clipvalue": {"clipvalue": 0.02},
    "global_clipnorm": {"global_clipnorm": 0.2},
    "use_ema": {"use_ema": True, "ema_momentum": 0.9},
    "ema_overwrite_frequency": {"use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 5},
    "gradient_accumulation_steps": {"gradient_accumulation_steps": 3},
    "loss_scale_factor": {"loss_scale_factor": 128.0},
    "exclude_from_weight_decay": {"exclude": ["bias", "gamma"]},
    "schedule": {"learning_rate": "cosine"},
    "all_at_once": {
        "gradient_accumulation_steps": 2,
        "global_clipnorm": 0.5,
        "use_ema": True,
        "ema_momentum": 0.8,
        "loss_scale_factor": 4.0,
        "exclude": ["beta"],
        "learning_rate": "cosine",
    },
}
CLASSES = {"keras/adamw": "AdamW", "keras/adamax": "Adamax"}


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 12)).astype("float32")
    return x, (x @ rng.normal(size=(12, 3)) + 0.1 * rng.normal(size=(96, 3))).astype("float32")


def _model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((12,)),
            keras.layers.Dense(32, activation="gelu"),
            keras.layers.LayerNormalization(),
            keras.layers.Dense(3),
        ]
    )


def _settings(case: dict) -> dict:
    settings = HYPERS | case
    if settings["learning_rate"] == "cosine":
        settings["learning_rate"] = keras.optimizers.schedules.CosineDecay(3e-3, 40, alpha=0.1)
    return settings


def _fit(optimizer, exclude=None, epochs=EPOCHS, model=None):
    if exclude:
        optimizer.exclude_from_weight_decay(var_names=exclude)
    model = model or _model()
    model.compile(optimizer=optimizer, loss="mse")
    x, y = _data()
    model.fit(x, y, epochs=epochs, batch_size=16, shuffle=False, verbose=0)
    return model


def _weights(model):
    return [np.asarray(w) for w in model.get_weights()]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("spec", sorted(CLASSES))
def test_model_fit_matches_keras(spec, case):
    if case == "amsgrad" and spec != "keras/adamw":
        pytest.skip("Keras's Adamax has no amsgrad")
    settings = _settings(CASES[case])
    exclude = settings.pop("exclude", None)
    if spec == "keras/adamax" and case in ("defaults", "schedule"):
        settings.pop("weight_decay")  # Keras's Adamax default: no decay
    want = _fit(getattr(keras.optimizers, CLASSES[spec])(**settings), exclude)
    got = _fit(optgen.keras.Optimizer(spec, **settings), exclude)
    start = _model().get_weights()
    assert all(not np.array_equal(w, s) for w, s in zip(_weights(want), start, strict=True)), (
        "every weight must train"
    )
    assert_trees_close(_weights(got), _weights(want), 1e-5)


def test_exclude_by_variable_and_by_constructor_argument_match_keras():
    want_optimizer = keras.optimizers.AdamW(**HYPERS)
    model = _model()
    want_optimizer.exclude_from_weight_decay(var_list=[model.layers[0].kernel], var_names=["gamma"])
    want = _fit(want_optimizer, model=model)
    model = _model()
    got_optimizer = optgen.keras.Optimizer(
        "keras/adamw", **HYPERS, exclude_from_weight_decay=["gamma"]
    )
    got_optimizer.exclude_from_weight_decay(var_list=[model.layers[0].kernel], var_names=["gamma"])
    assert_trees_close(_weights(_fit(got_optimizer, model=model)), _weights(want), 1e-5)
    plain = _fit(
        optgen.keras.Optimizer("keras/adamw", **HYPERS, exclude_from_weight_decay=["gamma"])
    )
    assert rel_err(_weights(plain)[0], _weights(want)[0]) > 1e-4  # excluding the kernel mattered


def test_include_in_weight_decay_overrides_exclude():
    """TF Model Garden's rule on Keras variable names: including "beta" undoes excluding it."""
    base = {"spec": "tfm/adamweightdecay", "weight_decay_rate": 0.1, "learning_rate": 3e-3}
    excluded = _fit(optgen.keras.Optimizer(**base, exclude_from_weight_decay=["bias", "beta"]))
    included = _fit(
        optgen.keras.Optimizer(
            **base, exclude_from_weight_decay=["bias", "beta"], include_in_weight_decay=["beta"]
        )
    )
    only_bias = _fit(optgen.keras.Optimizer(**base, exclude_from_weight_decay=["bias"]))
    assert_trees_close(_weights(included), _weights(only_bias), 0.0)
    assert not all(
        np.array_equal(a, b) for a, b in zip(_weights(included), _weights(excluded), strict=True)
    )


def test_apply_gradients_outside_fit_matches_keras():
    rng = np.random.default_rng(3)
    values = [rng.normal(size=(4, 3)).astype("float32"), rng.normal(size=(3,)).astype("float32")]
    results = []
    for optimizer in (
        keras.optimizers.AdamW(**HYPERS),
        optgen.keras.Optimizer("keras/adamw", **HYPERS),
    ):
        variables = [keras.Variable(v) for v in values]
        for step in range(20):
            grads = [
                keras.ops.convert_to_tensor(
                    np.random.default_rng(step).normal(size=v.shape).astype("float32")
                )
                for v in values
            ]
            optimizer.apply_gradients(zip(grads, variables, strict=True))
        assert int(optimizer.iterations) == 20
        results.append([np.asarray(v.value) for v in variables])
    assert_trees_close(results[1], results[0], 1e-5)


def test_apply_gradients_in_another_order_or_on_other_variables():
    rng = np.random.default_rng(4)
    values = [rng.normal(size=(4, 3)).astype("float32"), rng.normal(size=(3,)).astype("float32")]
    grads = [np.ones((4, 3), "float32"), np.full((3,), 2.0, "float32")]
    ordered = [keras.Variable(v) for v in values]
    optimizer = optgen.keras.Optimizer("keras/adamw", **HYPERS)
    optimizer.apply_gradients(zip(grads, ordered, strict=True))
    swapped = [keras.Variable(v) for v in values]
    other = optgen.keras.Optimizer("keras/adamw", **HYPERS)
    other.build(swapped)
    other.apply_gradients(zip(grads[::-1], swapped[::-1], strict=True))
    assert_trees_close(
        [np.asarray(v.value) for v in swapped], [np.asarray(v.value) for v in ordered], 0.0
    )
    with pytest.raises(optgen.SpecError) as err:
        other.apply_gradients([(grads[0], swapped[0])])
    assert err.value.code == "E373"


def test_learning_rate_get_and_set():
    optimizer = optgen.keras.Optimizer("keras/adamw", **HYPERS)
    assert float(optimizer.learning_rate) == pytest.approx(3e-3)
    model = _fit(optimizer, epochs=1)
    optimizer.learning_rate = 1e-2
    assert float(optimizer.learning_rate) == pytest.approx(1e-2)
    model.fit(*_data(), epochs=1, batch_size=16, shuffle=False, verbose=0)
    want_optimizer = keras.optimizers.AdamW(**HYPERS)
    want = _fit(want_optimizer, epochs=1)
    want_optimizer.learning_rate = 1e-2
    want.fit(*_data(), epochs=1, batch_size=16, shuffle=False, verbose=0)
    assert_trees_close(_weights(model), _weights(want), 1e-5)


def test_variables_and_iterations():
    optimizer = optgen.keras.Optimizer("keras/adamw", **HYPERS, gradient_accumulation_steps=2)
    _fit(optimizer, epochs=1)
    # Keras's: updates applied
    assert int(optimizer._iterations) == 6 and int(optimizer.iterations) == 3
    names = [v.name for v in optimizer.variables]
    assert names[:2] == ["iteration", "learning_rate"] and len(names) == len(set(names))


def test_a_second_fit_compiles_nothing(caplog):
    """The state starts uncommitted, as Keras's variables do: fit does not compile its train step
    twice.
    """
    import jax

    model = _fit(optgen.keras.Optimizer("keras/adamw", **HYPERS), epochs=1)
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        model.fit(*_data(), epochs=1, batch_size=16, shuffle=False, verbose=0)
    assert "Compiling jit(train_step)" not in caplog.text


def test_save_and_load_model_continues_identically(tmp_path):
    """A saved model (with its optimizer state) trains on exactly as the model it was saved from."""
    settings = _settings(CASES["all_at_once"])
    exclude = settings.pop("exclude")
    model = _fit(
        optgen.keras.Optimizer("keras/adamw", **settings, exclude_from_weight_decay=exclude),
        epochs=1,
    )
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert isinstance(loaded.optimizer, optgen.keras.Optimizer)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value))
    for m in (model, loaded):
        m.fit(*_data(), epochs=2, batch_size=16, shuffle=False, verbose=0)
    assert_trees_close(_weights(loaded), _weights(model), 0.0)
    # 18 calls, 2 per update
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) == 9


def test_get_config_round_trips_through_json():
    optimizer = optgen.keras.Optimizer(
        "keras/adamw",
        **_settings(CASES["schedule"]),
        amsgrad=True,
        clipnorm=1.0,
        skip_nonfinite=True,
        exclude_from_weight_decay=["bias"],
        name="mine",
    )
    config = json.loads(json.dumps(keras.optimizers.serialize(optimizer)))
    again = keras.optimizers.deserialize(config)
    assert type(again) is optgen.keras.Optimizer
    assert again.get_config() == optimizer.get_config()
    config = again.get_config()
    assert (
        config["amsgrad"] is True and config["beta_1"] == 0.8 and config["skip_nonfinite"] is True
    )
    assert config["exclude_from_weight_decay"] == ["bias"] and config["clipnorm"] == 1.0


def test_get_config_of_a_spec_file_records_its_digest(tmp_path):
    path = tmp_path / "mine.spec"
    path.write_text(
        "optimizer mine\nhyper learning_rate = 0.1\nupdate:\n  p = p - learning_rate * g\n"
    )
    config = optgen.keras.Optimizer(str(path)).get_config()
    assert config["sha256"]
    path.write_text(path.read_text() + "# edited\n")
    with pytest.raises(optgen.SpecError, match="E349"):
        optgen.keras.Optimizer.from_config(config)


@pytest.mark.parametrize(
    "kwargs, code",
    [
        ({"spec": "torch/adamw"}, "E371"),
        ({"spec": "keras/adamw", "mask": [True]}, "E372"),
        ({"spec": "adam", "weight_decay": 0.1}, "E302"),
        ({"spec": "keras/adamw", "clipnorm": -1.0}, "E342"),
    ],
)
def test_mistakes_are_diagnostics(kwargs, code):
    with pytest.raises(optgen.Diagnostic) as err:
        optgen.keras.Optimizer(**kwargs)
    assert err.value.code == code


def test_another_backend_is_refused_naming_jax():
    code = (
        "import optgen, optgen.keras\ntry:\n    optgen.keras.Optimizer('keras/adamw')\n"
        "except optgen.SpecError as err:\n    print(err.render())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"KERAS_BACKEND": "numpy"},
    )
    assert (
        "error[E370]: optgen.keras.Optimizer runs on Keras's JAX backend; this Keras runs on "
        "'numpy'" in result.stdout
    )
    assert "hint: set KERAS_BACKEND=jax" in result.stdout


def test_the_submodule_does_not_shadow_keras():
    import optgen.keras as adapter

    assert sys.modules["keras"] is keras and adapter.keras is keras and adapter is not keras


def test_readme_examples_run(tmp_path, monkeypatch):
    """The "Coming from Keras" section's code (docs/frameworks.md), in order; the restored model
    trains on as the saved one.
    """
    readme = (Path(__file__).parent.parent / "docs" / "frameworks.md").read_text()
    section = readme[
        readme.index("## Coming from Keras\n") : readme.index("## Coming from TF Model Garden")
    ]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", section, re.S):
        exec(block, namespace)
    model, restored = namespace["model"], namespace["restored"]
    assert (
        isinstance(restored.optimizer, optgen.keras.Optimizer) and restored.optimizer.spec == "lion"
    )
    model.fit(namespace["x"], namespace["y"], epochs=1, batch_size=32, shuffle=False, verbose=0)
    assert_trees_close(_weights(restored), _weights(model), 0.0)
