"""The optimizer runtime and codegen: JAX composition, hyperparameters, artifacts, reductions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    as_jax,
    assert_trees_close,
    count_compiles,
    make_grads,
    make_params,
    rel_err,
    run_steps,
)
from optgen.codegen import export
from optgen.codegen.interpret import interpret

import optgen
from optgen.types import DTYPES

EVERY_BUILTIN = """optimizer kitchen "every function, a reduction per tensor and across tensors"
hyper learning_rate = 0.1
hyper max_norm = 1.0
state v = 0.5 * p + learning_rate
update:
  scale = min(1, max_norm / global_norm(g))
  v = 0.9 * v + where(g > 0 and p < 1, g, 0.5 * g) * scale
  c = clip(v, -mean(abs(v)), norm(v) / sqrt(sum(v * v) + 1))
  d = c + sign(p) * exp(-abs(p)) * log(1 + abs(g)) + rsqrt(1 + g^2) + max(p, 0)^1.5
  p = p - learning_rate * d
"""


def test_every_builtin_through_xla_matches_the_float64_interpreter(tmp_path, x64):
    path = tmp_path / "kitchen.spec"
    path.write_text(EVERY_BUILTIN)
    opt = optgen.load(str(path), learning_rate=0.05)
    params = jax.tree.map(jnp.asarray, make_params(np.float64))
    # copies: step donates params
    leaves, treedef = jax.tree.flatten(jax.tree.map(np.array, params))
    state = opt.init(params)
    program = opt.compiled.program
    v = interpret(program.init, {"p": leaves}, {"learning_rate": 0.05, "max_norm": 1.0})["v"]
    p = leaves
    for step in range(5):
        grads = make_grads(params, step, np.float64)
        params, state = opt.step(params, grads, state)
        ref = interpret(
            program.update,
            {"p": p, "g": treedef.flatten_up_to(grads), "v": v},
            {"t": step + 1, "learning_rate": 0.05, "max_norm": 1.0},
        )
        p, v = ref["p"], ref["v"]
    for got, want in zip(jax.tree.leaves(params), p, strict=True):
        assert rel_err(got, want) < 1e-12


def test_stablehlo_verifies_and_carries_spec_locations():
    program = optgen.load("adamw").compiled.program
    text = export.stablehlo_text(program, DTYPES["f32"], "n")
    assert 'loc("adamw.spec":14:' in text and 'loc("adamw.spec":18:' in text
    assert "tensor<?xf32>" in text


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_artifact_round_trip_gives_the_same_numbers(tmp_path, dtype):
    from optgen.artifact import save_artifact

    opt = optgen.load("adamw", weight_decay=1e-2)
    path = tmp_path / "adamw.optgen"
    save_artifact(str(path), opt.compiled, dtype, "n", ["cpu", "cuda", "tpu"])
    artifact = optgen.load_artifact(str(path))
    with export.x64_for(DTYPES[dtype]):
        np_dtype = DTYPES[dtype]
        rng = np.random.default_rng(0)
        p, g = rng.normal(size=33).astype(np_dtype), rng.normal(size=33).astype(np_dtype)
        state = opt.init({"w": jnp.asarray(p)})
        expected, _ = opt.step({"w": jnp.asarray(p)}, {"w": jnp.asarray(g)}, state)
        out = artifact(p=p, g=g, mu=np.zeros_like(p), nu=np.zeros_like(p), t=1, weight_decay=1e-2)
        np.testing.assert_array_equal(out["p"], expected["w"])
        assert out["p"].dtype == np_dtype


def test_damaged_artifact_is_refused(tmp_path):
    path = tmp_path / "x.optgen"
    path.write_bytes(b"not an artifact")
    with pytest.raises(optgen.SpecError, match="not an optgen artifact"):
        optgen.load_artifact(str(path))


def test_changing_a_hyperparameter_never_recompiles():
    opt = optgen.load("adamw")
    traces = []

    @jax.jit
    def train_step(params, grads, state):
        traces.append(1)
        return opt.step(params, grads, state)

    params = {"w": jnp.ones(8)}
    state = opt.init(params)
    results = []
    for lr in (1e-3, 1e-1):
        state = state._replace(hyperparams={**state.hyperparams, "learning_rate": jnp.float32(lr)})
        new_params, _ = train_step(params, {"w": jnp.ones(8)}, state)
        results.append(new_params["w"])
    assert len(traces) == 1
    assert not np.allclose(results[0], results[1])


@pytest.mark.parametrize(
    "spec, committed", [("adamw", True), ("adafactor", True), ("novograd", True), ("adamw", False)]
)
def test_step_compiles_once(spec, committed):
    # init's count and hyperparameters come out placed as step's outputs are; made
    # uncommitted, the second step compiled the whole step again. Plain jnp.asarray
    # parameters (uncommitted) compile once too, as optax's jitted step does.
    opt = optgen.load(spec)
    device = jax.devices()[0]
    place = (lambda x: jax.device_put(x, device)) if committed else jnp.asarray
    params = {"b": place(np.ones(64, np.float32)), "w": place(np.ones((32, 16), np.float32))}
    grads = jax.tree.map(lambda x: place(0.1 * np.asarray(x)), params)
    state = opt.init(params)
    params, state = opt.step(params, grads, state)
    with count_compiles() as compiles:
        for _ in range(3):
            params, state = opt.step(params, grads, state)
    assert compiles.n == 0


def test_schedule_matches_optax():
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 10, 50)
    opt, tx = optgen.load("adamw", learning_rate=schedule), optax.adamw(schedule)
    ours, _ = run_steps(opt, as_jax(make_params(np.float32)), 30, path="step")
    theirs, _ = run_steps(tx, as_jax(make_params(np.float32)), 30)
    assert_trees_close(ours, theirs, 2e-4)


def test_drops_into_optax_chain_inside_a_user_jit():
    opt = optgen.load("adam", learning_rate=1e-2)
    tx = optax.chain(optax.clip_by_global_norm(1.0), opt)
    ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    params = as_jax(make_params(np.float32))
    ours, _ = run_steps(tx, params, 20, jit=True)  # tx.update inside the user's jax.jit
    theirs, _ = run_steps(ref, params, 20)
    assert_trees_close(ours, theirs, 2e-4)


def test_step_donates_params_and_state():
    opt = optgen.load("adamw")
    params = {"w": jnp.ones(1024)}
    state = opt.init(params)
    old_w, old_mu = params["w"], state.slots["mu"]["w"]
    new_params, new_state = opt.step(params, {"w": jnp.ones(1024)}, state)
    assert old_w.is_deleted() and old_mu.is_deleted()
    assert int(new_state.count) == 1


def test_state_initial_value_is_an_expression_of_p_and_hypers(tmp_path):
    path = tmp_path / "ema.spec"
    path.write_text(
        "optimizer ema\nhyper lr = 0.5\nhyper decay = 0.9\nstate avg = p + lr\n"
        "update:\n  p = p - lr * g\n  avg = decay * avg + (1 - decay) * p\n"
    )
    opt = optgen.load(str(path))
    state = opt.init({"w": jnp.arange(3.0)})
    np.testing.assert_allclose(state.slots["avg"]["w"], [0.5, 1.5, 2.5])


def test_unknown_keyword_suggests_the_hyperparameter():
    with pytest.raises(
        optgen.InputError, match="no hyperparameter or option 'learning_rat'"
    ) as err:
        optgen.load("adamw", learning_rat=1e-3)
    assert "did you mean 'learning_rate'" in err.value.render()


def test_a_factored_artifact_steps_as_the_optimizer_does(tmp_path):
    # Its row and col inputs are shaped as the step stores v_row and v_col (they were the
    # parameter's shape: an MLIR verifier error).
    from optgen.artifact import save_artifact

    opt = optgen.load("adafactor")
    path = tmp_path / "adafactor.optgen"
    save_artifact(str(path), opt.compiled, "f32", "256,128", ["cpu"])
    params, grads = {"w": jnp.ones((256, 128))}, {"w": jnp.full((256, 128), 0.5)}
    state = opt.init(params)
    out = optgen.load_artifact(str(path))(
        p=params["w"], g=grads["w"], t=1, **{name: slot["w"] for name, slot in state.slots.items()}
    )
    expected, _ = opt.step(params, grads, state)
    np.testing.assert_array_equal(out["p"], expected["w"])


def test_runtime_imports_run_one_way():
    # load and checkpoint -> optimizer -> validate, parts, packing, ... -> state; a module imports
    # only those below it
    import ast
    import pathlib

    order = [
        "state",
        "serialization",
        "config",
        "placement",
        "packing",
        "parts",
        "validate",
        "optimizer",
        "checkpoint",
        "load",
    ]
    folder = pathlib.Path(optgen.__file__).parent / "runtime"
    assert sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__") == sorted(order)
    for name in order:
        tree = ast.parse((folder / f"{name}.py").read_text())
        # module level: imports under TYPE_CHECKING or in functions are for types and lazy use
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "optgen.runtime"
            ):
                imported = (
                    [node.module.rsplit(".", 1)[1]]
                    if node.module != "optgen.runtime"
                    else [alias.name for alias in node.names]
                )
                for other in imported:
                    assert order.index(other) < order.index(name), (
                        f"runtime/{name}.py imports runtime/{other}.py"
                    )
