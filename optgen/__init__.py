"""optgen: a compiler for optimizers.

    >>> import optgen, optax
    >>> opt = optgen.load("adamw", learning_rate=1e-3)
    >>> state = opt.init(params)
    >>> updates, state = opt.update(grads, state, params)      # optax protocol
    >>> params, state = opt.step(params, grads, state)         # fused, in place
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable

from optgen.codegen import fusion

fusion.request_cpu_multi_output_fusion()  # before JAX starts its CPU backend; see codegen/fusion.py

from optgen import schedules
from optgen.artifact import Artifact, load_artifact
from optgen.checkpoint import load_state, save_state
from optgen.compiler import Compiled, check_spec, compile_checked, user_warnings
from optgen.config import from_config
from optgen.diagnostics import InputError, SpecError, SpecWarning
from optgen.library import builtin_names
from optgen.passes import DEFAULT_PIPELINE
from optgen.runtime import Optimizer, OptState, split_kwargs
from optgen.transforms import split_options
from optgen.validate import check_hyperparams

__version__ = "0.1.0"
__all__ = ["Artifact", "Compiled", "InputError", "OptState", "Optimizer", "SpecError", "SpecWarning", "builtin_names",
           "from_config", "load", "load_artifact", "load_state", "save_state", "schedules", "__version__"]


def __getattr__(name: str):
    # optgen.keras imports Keras, so only on first use: ``optgen.keras.Optimizer(...)``.
    if name == "keras":
        import importlib

        return importlib.import_module("optgen.keras")
    raise AttributeError(f"module 'optgen' has no attribute {name!r}")


def load(spec: str, *, passes: Iterable[str] = DEFAULT_PIPELINE, **kwargs: Any) -> Optimizer:
    """Compile a built-in spec (``"adamw"``) or a ``.spec`` file into an :class:`Optimizer`.

    Keyword arguments set hyperparameters (a number, or a schedule: a callable of the
    step count, e.g. from :mod:`optgen.schedules`), options (``nesterov=True``), and the
    options every spec takes, with Keras's names (``clipnorm``, ``global_clipnorm``,
    ``use_ema``, ... see :mod:`optgen.transforms`); anything else is an error that
    names the spec's hyperparameters. Options recompile; hyperparameters never do.
    """
    checked = check_spec(spec)
    for warning in user_warnings(spec, checked):
        warnings.warn(warning.render(), SpecWarning, stacklevel=2)
    variant, kwargs = split_options(kwargs)
    options, hypers = split_kwargs(checked.options, checked.hypers, checked.name, kwargs)
    check_hyperparams(checked.name, checked.ranges, hypers)
    compiled = compile_checked(checked, options, passes, variant=variant)
    return Optimizer(compiled, hypers | variant.hyperparams(compiled.program), variant)
