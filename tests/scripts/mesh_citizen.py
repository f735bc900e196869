"""Run by tests/test_sharding.py in a fresh process with 8 host devices: optgen on meshes as
a JAX user meets them, each beside optax on one device.

Prints one JSON line: per scenario, the largest difference from optax's numbers, the
shardings of the results and, for ZeRO-1, the collectives in the compiled step.
"""

import json
import re
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optgen  # first: it sets XLA:CPU's fusion option before JAX starts

rng = np.random.default_rng(0)
HOST = {
    "w": rng.normal(size=(16, 8)).astype(np.float32),
    "b": rng.normal(size=(8,)).astype(np.float32),
}
X = rng.normal(size=(32, 16)).astype(np.float32)
Y = rng.normal(size=(32, 8)).astype(np.float32)
STEPS = 3


def loss(params, x, y):
    return jnp.mean((jnp.tanh(x @ params["w"] + params["b"]) - y) ** 2)


def reference():
    """optax's AdamW on one device: the numbers every scenario must give."""
    opt = optax.adamw(1e-2, weight_decay=1e-3)
    params = jax.device_put(HOST, jax.devices()[0])
    state = opt.init(params)
    for _ in range(STEPS):
        updates, state = opt.update(jax.grad(loss)(params, X, Y), state, params)
        params = optax.apply_updates(params, updates)
    return params


def diff(params, want) -> float:
    return max(float(np.max(np.abs(np.asarray(params[k]) - np.asarray(want[k])))) for k in HOST)


def specs(tree) -> dict:
    return {k: str(v.sharding.spec) for k, v in tree.items()}


def opt():
    return optgen.load("adamw", learning_rate=1e-2, weight_decay=1e-3)


def sharded_training(axis_type, layout, use_step: bool):
    """Params laid out by ``layout`` on a 4x2 mesh of ``axis_type`` axes; batch sharded
    over data.
    """
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type, axis_type))
    o = opt()
    with jax.set_mesh(mesh):
        params = {k: jax.device_put(v, NamedSharding(mesh, layout[k])) for k, v in HOST.items()}
        x, y = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (X, Y))
        state = o.init(params)
        init_specs = specs(state.slots["mu"])

        @jax.jit
        def train_step(params, state, x, y):
            grads = jax.grad(loss)(params, x, y)
            if use_step:
                return o.step(params, grads, state)
            updates, state = o.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        for _ in range(STEPS):
            params, state = train_step(params, state, x, y)
    return {
        "diff": diff(params, reference()),
        "params": specs(params),
        "state_init": init_specs,
        "state": specs(state.slots["nu"]),
        "expected": {k: str(v) for k, v in layout.items()},
    }


def zero1():
    """Params (and gradients) replicated, state sharded over the data axis: each device updates its
    shard, and the new parameters are gathered once."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    o = opt()
    replicated, over_data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    params = jax.device_put(HOST, replicated)
    state = o.init(params)
    state_shardings = jax.tree.map(
        lambda x: over_data if x.ndim and x.shape[0] % 8 == 0 else replicated, state
    )
    state = jax.device_put(state, state_shardings)

    def train_step(params, state):
        updates, state = o.update(jax.grad(loss)(params, X, Y), state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(train_step, out_shardings=(replicated, state_shardings), donate_argnums=1)
    hlo = step.lower(params, state).compile().as_text()
    for _ in range(STEPS):
        params, state = step(params, state)
    updated_shape = re.search(
        # the update of w's 16 rows, per device
        r"f32\[(\d+),8\]\S* sqrt\(",
        hlo,
    )
    return {
        "diff": diff(params, reference()),
        "params": specs(params),
        "state": specs(state.slots["mu"]),
        "collectives": sorted(
            set(re.findall(r"all-gather|all-reduce|all-to-all|reduce-scatter", hlo))
        ),
        "update_rows_per_device": int(updated_shape.group(1)) if updated_shape else None,
    }


def shard_map_update():
    """The update inside shard_map, over parameters sharded by rows (each shard updated
    on its own).
    """
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    o = opt()
    layout = {"w": P("data"), "b": P()}
    params = {k: jax.device_put(v, NamedSharding(mesh, layout[k])) for k, v in HOST.items()}
    state = o.init(params)
    state_specs = jax.tree.map(lambda x: x.sharding.spec, state)

    @jax.jit
    def train_step(params, state):
        grads = jax.grad(loss)(params, X, Y)

        def local(p, g, s):
            updates, s = o.update(g, s, p)
            return optax.apply_updates(p, updates), s

        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(layout, layout, state_specs),
            out_specs=(layout, state_specs),
        )(params, grads, state)

    for _ in range(STEPS):
        params, state = train_step(params, state)
    return {"diff": diff(params, reference()), "params": specs(params)}


def orbax_onto_eight_devices():
    """A state saved from one device, restored into an 8-device layout with orbax, then stepped."""
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        return {"skipped": "orbax-checkpoint is not installed (pip install -e '.[frameworks]')"}

    o = opt()
    one = jax.device_put(HOST, jax.devices()[0])
    state = o.init(one)
    updates, state = o.update(jax.grad(loss)(one, X, Y), state, one)
    one = optax.apply_updates(one, updates)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    layout = {"w": NamedSharding(mesh, P("data")), "b": NamedSharding(mesh, P())}
    params = {k: jax.device_put(np.asarray(v), layout[k]) for k, v in one.items()}
    # orbax's recipe: the target layout is the state init makes for the 8-device parameters.
    template = jax.tree.map(ocp.utils.to_shape_dtype_struct, o.init(params))
    with tempfile.TemporaryDirectory() as tmp, ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(f"{tmp}/state", state)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(f"{tmp}/state", template)
    restored_specs = specs(restored.slots["mu"])
    for _ in range(STEPS - 1):
        params, restored = o.step(params, jax.grad(loss)(params, X, Y), restored)
    return {"diff": diff(params, reference()), "state": restored_specs}


SCENARIOS = {
    "explicit_sharded": lambda: sharded_training(
        AxisType.Explicit, {"w": P("data", "model"), "b": P("model")}, False
    ),
    "explicit_sharded_step": lambda: sharded_training(
        AxisType.Explicit, {"w": P(None, "model"), "b": P()}, True
    ),
    "auto_sharded": lambda: sharded_training(
        AxisType.Auto, {"w": P("data", "model"), "b": P("model")}, False
    ),
    "explicit_replicated": lambda: sharded_training(AxisType.Explicit, {"w": P(), "b": P()}, False),
    "auto_replicated_step": lambda: sharded_training(AxisType.Auto, {"w": P(), "b": P()}, True),
    "zero1": zero1,
    "shard_map": shard_map_update,
    "orbax": orbax_onto_eight_devices,
}

results = {"devices": len(jax.devices())}
for name in sys.argv[1:] or SCENARIOS:
    try:
        results[name] = SCENARIOS[name]()
    except Exception as err:  # reported per scenario, so one failure does not hide the others
        results[name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
print(json.dumps(results))
