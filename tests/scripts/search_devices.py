"""One round of the search on 8 CPU devices: 8 children, each scored on its own device.

Run in a fresh process by tests/test_search.py (the device count is fixed when JAX starts).
"""

import os
import sys
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import jax  # noqa: E402

from optgen.search.evaluate import launch, prepare  # noqa: E402
from optgen.search.evolve import Evolution  # noqa: E402
from optgen.search.program import load, program_of  # noqa: E402
from optgen.search.run import settings_for  # noqa: E402
from optgen.search.tasks import load_task  # noqa: E402

assert len(jax.local_devices()) == 8, jax.local_devices()
task = prepare(load_task("quadratic"))
with tempfile.TemporaryDirectory() as folder:
    settings = settings_for("adamw", ["quadratic"], population=8, tournament=2, seed=0)
    evolution = Evolution(settings, [task], Path(folder))
    children = evolution.round(0.0, 0.0)
    assert [c.device for c in children] == list(range(8)), [c.device for c in children]
    assert len({c.digest for c in children}) == 8
    # The same program gives the same losses on every device.
    opt = load(program_of(settings["seed_text"]), Path(folder))
    results = [launch(opt, task, device=d) for d in jax.local_devices()]
    assert [next(iter(r.devices())) for r in results] == jax.local_devices()
    first = results[0].tolist()
    assert all(r.tolist() == first for r in results), [r.tolist() for r in results]
print("ok", file=sys.stderr)
