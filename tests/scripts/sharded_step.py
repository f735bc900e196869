"""Run by tests/test_fusion.py in a fresh process with 8 host devices: a step on sharded parameters.

Prints one JSON line: the shardings of parameters and state before and after, the
collectives in the compiled step, and the largest difference from an unsharded step.
"""

import json
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optgen  # first: it sets XLA:CPU's fusion option before JAX starts

mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
# b and c are small and replicated: their state is packed into one buffer; w and v keep their own,
# and so does s, small but sharded (packing it would gather it).
layout = {"w": P("data", "model"), "v": P(None, "model"), "b": P(), "c": P(), "s": P("data")}
rng = np.random.default_rng(0)
host = {
    "w": rng.normal(size=(64, 32)),
    "v": rng.normal(size=(16, 8)),
    "b": rng.normal(size=(32,)),
    "c": rng.normal(size=(16,)),
    "s": rng.normal(size=(64,)),
}
host = {k: v.astype(np.float32) for k, v in host.items()}
grads_host = {k: np.float32(0.1) * v + 0.01 for k, v in host.items()}


def place(tree):
    return {k: jax.device_put(v, NamedSharding(mesh, layout[k])) for k, v in tree.items()}


COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: (
        COMPILES.append(1) if event == "/jax/core/compile/backend_compile_duration" else None
    )
)
opt = optgen.load("adamw", learning_rate=1e-2, pack=True)
params, grads = place(host), place(grads_host)
state = opt.init(params)
init_shardings = {k: str(state.slots["mu"][k].sharding.spec) for k in host}
hlo = opt.step.lower(params, grads, state).compile().as_text()
before = len(COMPILES)
for _ in range(2):
    params, state = opt.step(params, grads, state)
# compiled by lower() above; init places its outputs as step does
step_compiles = len(COMPILES) - before
with tempfile.TemporaryDirectory() as tmp:  # a restored state is placed as init places it
    optgen.save_state(f"{tmp}/state", state, opt)
    state = optgen.load_state(f"{tmp}/state", opt, params)
restored_shardings = {k: str(state.slots["nu"][k].sharding.spec) for k in host}
before = len(COMPILES)
params, state = opt.step(params, grads, state)  # the third step, from the restored state
step_compiles_after_restore = len(COMPILES) - before

reference, ref_state = {k: jnp.asarray(v) for k, v in host.items()}, None
ref_state = opt.init(reference)
for _ in range(3):
    reference, ref_state = opt.step(
        reference, {k: jnp.asarray(v) for k, v in grads_host.items()}, ref_state
    )

print(
    json.dumps(
        {
            "devices": len(jax.devices()),
            "params": {k: str(params[k].sharding.spec) for k in host},
            "expected": {k: str(layout[k]) for k in host},
            "state_init": init_shardings,
            "state_after": {k: str(state.slots["nu"][k].sharding.spec) for k in host},
            "packed_groups": [
                str(x.sharding.spec) for x in jax.tree.leaves(state.slots["mu"]) if x.shape == (48,)
            ],
            "collectives": sorted(
                set(
                    re.findall(
                        r"all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter", hlo
                    )
                )
            ),
            "step_compiles": step_compiles,
            "state_restored": restored_shardings,
            "step_compiles_after_restore": step_compiles_after_restore,
            "max_diff": max(
                float(np.max(np.abs(np.asarray(params[k]) - np.asarray(reference[k]))))
                for k in host
            ),
        }
    )
)
