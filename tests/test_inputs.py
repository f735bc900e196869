"""Wrong runtime input: one exception type (InputError), the leaf path, what was expected,
raised before anything is donated; and saved state that round-trips bit for bit or is refused."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import count_compiles

import optgen
from optgen import atomic
from optgen.diagnostics import InputError


def setup(dtype=jnp.float32):
    opt = optgen.load("adamw", learning_rate=0.1)
    params = {"w": jnp.ones((3, 4), dtype), "b": {"c": jnp.zeros(4, dtype)}}
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
    return opt, params, grads, opt.init(params)


def raises(code, fragment, fn, *args):
    with pytest.raises(InputError) as err:
        fn(*args)
    assert err.value.code == code and fragment in err.value.message, err.value.render()
    # a Diagnostic and a ValueError, not a SpecError: the value is wrong, not the spec
    assert isinstance(err.value, optgen.Diagnostic) and isinstance(err.value, ValueError)
    assert not isinstance(err.value, optgen.SpecError)
    return err.value


def bad_calls():
    opt, params, grads, state = setup()
    other = optgen.load("adamax")
    yield (
        "E307",
        "no leaf grads['b']['c']",
        lambda: opt.step(params, {"w": grads["w"], "b": {"d": grads["b"]["c"]}}, state),
    )
    yield (
        "E308",
        "grads['w'] has shape (4, 3), expected (3, 4)",
        lambda: opt.step(params, {**grads, "w": jnp.ones((4, 3))}, state),
    )
    yield (
        "E310",
        "grads['b']['c'] is an array of dtype int32",
        lambda: opt.update({**grads, "b": {"c": grads["b"]["c"].astype(jnp.int32)}}, state, params),
    )
    yield "E310", "params['w'] is a str", lambda: opt.init({"w": "x"})
    yield (
        "E310",
        "params['i'] is an array of dtype int32",
        lambda: opt.init({"i": jnp.zeros(3, jnp.int32)}),
    )
    yield "E311", "not an optgen OptState", lambda: opt.step(params, grads, {"mu": params})
    yield "E311", "another optimizer", lambda: opt.step(params, grads, other.init(params))
    yield "E307", "state.slots['mu']", lambda: opt.step(params, grads, opt.init({"w": params["w"]}))
    yield (
        "E308",
        "state.slots['mu']['w'] has shape (3, 5)",
        lambda: opt.step(params, grads, opt.init({**params, "w": jnp.ones((3, 5))})),
    )
    mistyped = {**state.hyperparams, "learning_rat": 1.0}
    del mistyped["learning_rate"]
    yield (
        "E302",
        "'learning_rat'",
        lambda: opt.step(params, grads, state._replace(hyperparams=mistyped)),
    )
    yield (
        "E306",
        "state.hyperparams['b1'] = 1.5",
        lambda: opt.step(
            params, grads, state._replace(hyperparams={**state.hyperparams, "b1": 1.5})
        ),
    )
    yield (
        "E305",
        "must be a number",
        lambda: opt.step(
            params, grads, state._replace(hyperparams={**state.hyperparams, "eps": "small"})
        ),
    )
    yield "E301", "needs params", lambda: opt.update(grads, state)
    yield (
        "E310",
        "grads['w'] is a str, not an array",
        lambda: opt.step(params, {**grads, "w": "x"}, state),
    )


@pytest.mark.parametrize("case", range(14))
def test_bad_input_is_one_error_naming_the_leaf(case):
    code, fragment, call = list(bad_calls())[case]
    raises(code, fragment, call)


def test_rejected_step_leaves_callers_arrays_valid():
    opt, params, grads, state = setup()
    bad = {**grads, "w": jnp.ones((4, 3))}
    with pytest.raises(InputError):
        opt.step(params, bad, state)
    # Nothing was donated: every array is still readable, and a good step works on them.
    for leaf in jax.tree.leaves((params, state)):
        assert not leaf.is_deleted()
        np.asarray(leaf)
    new_params, _ = opt.step(params, grads, state)
    assert params["w"].is_deleted() and np.all(np.isfinite(np.asarray(new_params["w"])))


@pytest.mark.parametrize(
    "kwargs, code, fragment",
    [
        ({"learning_rat": 1e-3}, "E302", "no hyperparameter or option 'learning_rat'"),
        ({"b1": 1.0}, "E306", "'b1' = 1 is outside its range [0, 1)"),
        ({"eps": -1e-8}, "E306", "outside its range [0, inf)"),
        ({"b2": "0.9"}, "E305", "must be a number"),
        ({"b2": [0.9]}, "E305", "must be a number"),
        ({"learning_rate": float("nan")}, "E305", "is nan"),
        ({"weight_decay": True}, "E305", "must be a number"),
    ],
)
def test_load_checks_hyperparameters(kwargs, code, fragment):
    err = raises(code, fragment, lambda: optgen.load("adamw", **kwargs))
    if code == "E302":
        assert err.hint == "did you mean 'learning_rate'?"


def test_inside_jit_checks_trace_time_only():
    opt, params, grads, state = setup()
    step = jax.jit(lambda p, g, s: opt.update(g, s, p))
    step(params, grads, state)
    with pytest.raises(InputError):
        step(params, {**grads, "w": jnp.ones((2, 2))}, state)


# -- saved state ----------------------------------------------------------------------------


def trained(dtype):
    opt, params, grads, state = setup(dtype)
    for _ in range(3):
        params, state = opt.step(params, grads, state)
    return opt, params, state


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_state_round_trips_bit_exactly(tmp_path, dtype):
    opt, params, state = trained(dtype)
    path = tmp_path / "state.opt"
    optgen.save_state(str(path), state, opt)
    back = optgen.load_state(str(path), opt, params)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert back.slots["mu"]["w"].dtype == dtype


def test_a_spec_with_inputs_saves_its_state_and_gives_outputs_without_them(tmp_path):
    """A spec's `input`s arrive with each step; saving a state (and opt.outputs) needs none (E362
    before).
    """
    spec = tmp_path / "scaled.spec"
    spec.write_text(
        "optimizer scaled\ninput h\nstate z = p\noutput x = 2 * z\nupdate:\n"
        "  z = z - 0.1 * h * g\n  p = p - 0.1 * h * g\n"
    )
    opt, params = optgen.load(str(spec)), {"w": jnp.ones((3, 2))}
    state = opt.init(params)
    params, state = opt.step(params, {"w": jnp.ones((3, 2))}, state, h={"w": jnp.full((3, 2), 2.0)})
    optgen.save_state(str(tmp_path / "state.opt"), state, opt)
    back = optgen.load_state(str(tmp_path / "state.opt"), opt, params)
    np.testing.assert_allclose(opt.outputs(params, back)["x"]["w"], 2 * (1 - 0.1 * 2.0), rtol=1e-6)
    with pytest.raises(InputError, match="needs the input 'h'") as err:
        opt.step(params, {"w": jnp.ones((3, 2))}, back)
    assert err.value.code == "E362"


def test_a_restored_state_steps_without_compiling_again(tmp_path):
    # load_state writes the saved values into a fresh init's buffers, committed as step's
    # outputs are; made with jnp.asarray, they cost a second compile of the step.
    opt, params, grads, _ = setup()
    params, grads = jax.device_put((params, grads), jax.devices()[0])  # committed, as in training
    state = opt.init(params)
    for _ in range(2):
        params, state = opt.step(params, grads, state)
    optgen.save_state(str(tmp_path / "state.opt"), state, opt)
    back = optgen.load_state(str(tmp_path / "state.opt"), opt, params)
    with count_compiles() as compiles:
        params, _ = opt.step(params, grads, back)
    assert compiles.n == 0


def test_damaged_or_foreign_state_is_refused(tmp_path):
    opt, params, state = trained(jnp.float32)
    path = tmp_path / "state.opt"
    optgen.save_state(str(path), state, opt)
    data = path.read_bytes()
    cases = {
        "truncated": (data[:-7], "E332"),
        "bit flip": (data[:-20] + bytes([data[-20] ^ 1]) + data[-19:], "E332"),
        "other format": (b"OPTGEN-STATE 2\n" + data[15:], "E331"),
        "empty": (b"", "E331"),
        "header": (data[:90] + b"X" + data[91:], "E332"),
        "digest line": (data[:20] + b"0" + data[21:], "E332"),
    }
    for name, (content, code) in cases.items():
        path.write_bytes(content)
        with pytest.raises(InputError) as err:
            optgen.load_state(str(path), opt, params)
        assert err.value.code == code, (name, err.value.render())
    path.write_bytes(data)
    with pytest.raises(InputError) as err:
        optgen.load_state(str(path), optgen.load("adam"), params)
    assert err.value.code == "E333"
    with pytest.raises(InputError) as err:
        optgen.load_state(str(path), opt, {**params, "w": jnp.ones((3, 5))})
    assert err.value.code == "E334" and "['w']" in err.value.message
    with pytest.raises(InputError) as err:
        optgen.load_state(str(tmp_path / "missing"), opt, params)
    assert err.value.code == "E330"


def test_save_state_checks_the_state_against_the_optimizer_before_writing(tmp_path):
    opt, params, state = trained(jnp.float32)
    path = tmp_path / "state.opt"
    optgen.save_state(str(path), state, opt)
    good = path.read_bytes()
    other_shape = opt.init({**params, "w": jnp.ones((3, 5))})
    other_dtype = opt.init(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    cases = [
        ((state, optgen.load("amsgrad")), "E311"),
        ((opt.init(params), optgen.load("adamw", use_ema=True)), "E311"),
        ((other_shape._replace(slots={**other_shape.slots, "nu": state.slots["nu"]}), opt), "E308"),
        ((other_dtype._replace(slots={**other_dtype.slots, "nu": state.slots["nu"]}), opt), "E309"),
        ((opt, state), "E350"),
        (({"mu": 1}, opt), "E350"),
    ]
    for args, code in cases:
        with pytest.raises(InputError) as err:
            optgen.save_state(str(path), *args)
        assert err.value.code == code, err.value.render()
        assert path.read_bytes() == good  # the good checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.opt"]


def test_a_schedule_against_a_constant_is_named_as_such(tmp_path):
    opt, params, state = trained(jnp.float32)
    optgen.save_state(str(tmp_path / "s"), state, opt)
    scheduled = optgen.load("adamw", learning_rate=lambda count: 0.1, weight_decay=1e-4)
    with pytest.raises(InputError) as err:
        optgen.load_state(str(tmp_path / "s"), scheduled, params)
    assert err.value.code == "E351" and "schedule" in err.value.message


def test_state_of_another_variant_is_named_as_such(tmp_path):
    opt, params, state = trained(jnp.float32)
    optgen.save_state(str(tmp_path / "s"), state, opt)
    # same spec, hyperparameters and options: only the state differs
    with pytest.raises(InputError) as err:
        optgen.load_state(
            str(tmp_path / "s"),
            optgen.load("adamw", learning_rate=0.1, skip_nonfinite=True),
            params,
        )
    assert err.value.code == "E333" and "total_notfinite" in err.value.message, err.value.render()


def test_save_state_copies_leaves_to_the_host_one_by_one(tmp_path):
    import tracemalloc

    opt = optgen.load("adamw")
    params = {"a": jnp.ones(1 << 20), "b": jnp.ones(1 << 20)}  # 4 MiB each: the state holds 16 MiB
    state = opt.init(params)
    tracemalloc.start()
    try:
        optgen.save_state(str(tmp_path / "s"), state, opt)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # two leaves at most (8 MiB); was 4x the state (64 MiB)
    assert peak < 10 << 20, f"{peak / 2**20:.1f} MiB"


# -- atomic writes ---------------------------------------------------------------------------


def test_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    opt, params, state = trained(jnp.float32)
    path = tmp_path / "state.opt"
    optgen.save_state(str(path), state, opt)
    before = path.read_bytes()

    real_fdopen = os.fdopen

    class Dies:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            # half the bytes reach the disk, then the process "dies"
            self.f.write(data[: len(data) // 2])
            raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: Dies(real_fdopen(fd, mode)))
    params2, state2 = opt.step(params, jax.tree.map(jnp.ones_like, params), state)
    with pytest.raises(KeyboardInterrupt):
        optgen.save_state(str(path), state2, opt)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.opt"]  # no temporary left behind


def test_every_writer_goes_through_write_atomic():
    """Nothing in optgen opens a file for writing except optgen/atomic.py."""
    import pathlib

    root = pathlib.Path(optgen.__file__).parent.parent
    offenders = []
    for folder in ("optgen", "codegen", "passes"):
        for file in (root / folder).rglob("*.py"):
            text = file.read_text()
            if file.name != "atomic.py" and re.search(
                r"open\([^)]*['\"][wax]|write_text\(|write_bytes\(|np\.save|\.tofile\(", text
            ):
                offenders.append(str(file))
    assert offenders == []


# -- determinism -------------------------------------------------------------------------------

_RUN = """
import numpy as np, jax, jax.numpy as jnp, optgen, hashlib
opt = optgen.load("nadamw", learning_rate=0.01)
rng = np.random.default_rng(0)
params = {
    "a": jnp.asarray(rng.normal(size=(64, 33)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=7), jnp.bfloat16),
}
state = opt.init(params)
for i in range(5):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
    params, state = opt.step(params, grads, state)
data = b"".join(np.asarray(x).tobytes() for x in jax.tree.leaves((params, state)))
print(hashlib.sha256(data).hexdigest())
"""


def test_same_inputs_same_bits_across_runs_and_processes(capsys):
    out = [
        subprocess.run(
            [sys.executable, "-c", _RUN], capture_output=True, text=True, check=True
        ).stdout
        for _ in range(2)
    ]
    for _ in range(2):  # and twice here, with fresh optimizers in this process
        exec(_RUN, {})
        out.append(capsys.readouterr().out)
    assert len(set(out)) == 1 and len(out[0].strip()) == 64, out


def test_non_finite_gradients_propagate_as_in_optax():
    import optax

    opt, params, grads, state = setup()
    grads = {**grads, "w": grads["w"].at[0, 1].set(jnp.nan).at[2, 2].set(jnp.inf)}
    ref = optax.adamw(0.1, weight_decay=1e-4)
    updates, _ = ref.update(grads, ref.init(params), params)
    theirs = optax.apply_updates(params, updates)
    ours, _ = opt.update(grads, state, params)
    ours = optax.apply_updates(params, ours)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.array_equal(np.isnan(a), np.isnan(b)) and np.array_equal(np.isinf(a), np.isinf(b))
        assert np.isnan(a).any() or np.allclose(a, b, rtol=1e-5)


_KILLED = """
import os, sys, jax.numpy as jnp, optgen
from optgen import atomic
opt = optgen.load("adamw")
params = {"w": jnp.ones((256, 64))}
state = opt.init(params)
optgen.save_state(sys.argv[1], state, opt)
real = os.fdopen
class Dies:
    def __init__(self, f): self.f = f
    def __enter__(self): return self
    def __exit__(self, *exc): pass
    def write(self, data):
        self.f.write(data[: len(data) // 3]); self.f.flush()
        os._exit(9)  # killed mid-write: no cleanup, no exception handlers
atomic.os.fdopen = lambda fd, mode: Dies(real(fd, mode))
params, state = opt.step(params, {"w": jnp.ones((256, 64))}, state)
optgen.save_state(sys.argv[1], state, opt)
"""


def test_process_killed_mid_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "state.opt"
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED, str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 9, proc.stderr
    opt = optgen.load("adamw")
    params = {"w": jnp.ones((256, 64))}
    back = optgen.load_state(str(path), opt, params)  # the first save, whole
    assert int(back.count) == 0 and float(jnp.abs(back.slots["mu"]["w"]).max()) == 0.0


def test_load_takes_a_path_object_and_refuses_other_types(tmp_path):
    import pathlib

    kernels = pathlib.Path(__file__).parent.parent / "kernels"
    assert optgen.load(kernels / "adam.spec").name == "adam"
    for bad, code in ((3, "E001"), (None, "E001"), (kernels, "E002")):
        with pytest.raises(optgen.SpecError) as err:
            optgen.load(bad)
        assert err.value.code == code, err.value.render()
