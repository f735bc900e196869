"""optgen: a compiler for optimizers.

    >>> import optgen, optax
    >>> opt = optgen.load("adamw", learning_rate=1e-3)
    >>> state = opt.init(params)
    >>> updates, state = opt.update(grads, state, params)      # optax protocol
    >>> params, state = opt.step(params, grads, state)         # fused, in place
"""

from __future__ import annotations

from typing import Any, Iterable

from optgen.codegen import fusion

fusion.request_cpu_multi_output_fusion()  # before JAX starts its CPU backend; see codegen/fusion.py

from optgen.artifact import Artifact, load_artifact
from optgen.compiler import Compiled, check_spec, compile_checked
from optgen.diagnostics import SpecError
from optgen.library import builtin_names
from optgen.passes import DEFAULT_PIPELINE
from optgen.runtime import Optimizer, OptState, split_kwargs

__version__ = "0.1.0"
__all__ = ["Artifact", "Compiled", "OptState", "Optimizer", "SpecError", "builtin_names",
           "load", "load_artifact", "__version__"]


def load(spec: str, *, passes: Iterable[str] = DEFAULT_PIPELINE, **kwargs: Any) -> Optimizer:
    """Compile a built-in spec (``"adamw"``) or a ``.spec`` file into an :class:`Optimizer`.

    Keyword arguments set hyperparameters (a number, or a schedule: a callable of the
    step count) and options (``nesterov=True``); anything else is an error that names
    the spec's hyperparameters. Options recompile; hyperparameters never do.
    """
    checked = check_spec(spec)
    options, hypers = split_kwargs(checked.options, checked.hypers, checked.name, kwargs)
    return Optimizer(compile_checked(checked, options, passes), hypers)
