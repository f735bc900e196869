"""optgen: a compiler for optimizers.

>>> import optgen, optax
>>> opt = optgen.load("adamw", learning_rate=1e-3)
>>> state = opt.init(params)
>>> updates, state = opt.update(grads, state, params)      # optax protocol
>>> params, state = opt.step(params, grads, state)         # fused, in place
"""

from __future__ import annotations

from optgen.codegen import fusion

fusion.request_cpu_multi_output_fusion()  # before JAX starts its CPU backend; see codegen/fusion.py

from optgen import schedules
from optgen.artifact import Artifact, load_artifact
from optgen.compiler import Compiled, check_spec, compile_checked
from optgen.diagnostics import Diagnostic, InputError, SpecError, SpecWarning
from optgen.library import builtin_names
from optgen.runtime.checkpoint import load_state, save_state
from optgen.runtime.load import from_config, load
from optgen.runtime.optimizer import Optimizer
from optgen.runtime.serialization import register_optax_states
from optgen.runtime.state import OptState

__version__ = "0.1.0"
__all__ = [
    "Artifact",
    "Compiled",
    "Diagnostic",
    "InputError",
    "OptState",
    "Optimizer",
    "SpecError",
    "SpecWarning",
    "builtin_names",
    "check_spec",
    "compile_checked",
    "from_config",
    "load",
    "load_artifact",
    "load_state",
    "register_optax_states",
    "save_state",
    "schedules",
    "__version__",
]


def __getattr__(name: str):
    # optgen.keras imports Keras, so only on first use: ``optgen.keras.Optimizer(...)``; likewise
    # optgen.search (program search over specs), which few programs need.
    if name in ("keras", "search"):
        import importlib

        return importlib.import_module(f"optgen.{name}")
    raise AttributeError(f"module 'optgen' has no attribute {name!r}")
