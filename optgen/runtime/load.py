"""``optgen.load``: a spec and keyword arguments in, an :class:`~optgen.runtime.optimizer.Optimizer`
out; and ``optgen.from_config``, its inverse of ``Optimizer.get_config``.

Compilations are cached by everything that decides them (spec text, options, transform
options, passes), so loading the same optimizer again, as ``optax.inject_hyperparams``
does at every update, costs a dictionary look-up and reuses the compiled step.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable
from typing import Any

from optgen import schedules
from optgen.checker import CheckedSpec, check
from optgen.codegen.fusion import LOWERINGS
from optgen.compiler import Compiled, compile_checked, user_warnings
from optgen.diagnostics import InputError, SpecError, SpecWarning, did_you_mean
from optgen.library import read_spec
from optgen.parser import parse
from optgen.passes import DEFAULT_PIPELINE, known_passes
from optgen.runtime.config import spec_digest
from optgen.runtime.optimizer import Optimizer
from optgen.runtime.validate import check_hyperparams
from optgen.transforms import DEFAULTS as TRANSFORM_OPTIONS
from optgen.transforms import TransformOptions, split_options

# grows with each distinct optimizer a process loads: a few per program
_COMPILED: dict[Any, Compiled] = {}


def load(
    spec: str,
    *,
    passes: Iterable[str] = DEFAULT_PIPELINE,
    pack: bool = False,
    lowering: str = "auto",
    **kwargs: Any,
) -> Optimizer:
    """Compile a built-in spec (``"adamw"``) or a ``.spec`` file into an :class:`Optimizer`.

    Keyword arguments set hyperparameters, options (``nesterov=True``), and the options
    every spec takes, with Keras's names (``clipnorm``, ``global_clipnorm``, ``use_ema``,
    ... see :mod:`optgen.transforms`); anything else is an error that names the spec's
    hyperparameters. Options recompile; hyperparameters never do. A hyperparameter is

    - a number: stored in the state (``state.hyperparams``), changeable between steps;
    - a schedule: a callable of the step count (e.g. from :mod:`optgen.schedules`);
    - a JAX array: used as given at every call (what ``optax.inject_hyperparams`` passes).

    ``pack=True`` keeps the state of small parameters in flat buffers, one per dtype:
    faster steps for thousands of small parameters, but the state is then not shaped like
    the parameters (docs/fusion.md, "Many small parameters").

    ``lowering`` chooses how the step becomes machine code (:mod:`codegen.fusion`): ``auto``
    (optgen's own CPU loop where it can run, else XLA's fused loops), ``ffi`` (the CPU loop,
    or an error where it cannot run), ``shared`` or ``per-output`` (XLA's loops).
    """
    if not isinstance(pack, bool):
        raise InputError(f"pack takes True or False, got {pack!r}", code="E381")
    if lowering not in LOWERINGS:
        raise InputError(
            f"lowering takes one of {', '.join(LOWERINGS)}, got {lowering!r}",
            hint=did_you_mean(str(lowering), LOWERINGS) or "leave it 'auto'",
            code="E385",
        )
    source = read_spec(spec)
    checked = _check(source.text, source.filename)
    for warning in user_warnings(spec, checked):
        warnings.warn(warning.render(), SpecWarning, stacklevel=2)
    transform_options, kwargs = split_options(kwargs)
    options, hypers = split_kwargs(checked, kwargs)
    check_hyperparams(checked.name, checked.ranges, hypers)
    passes = known_passes(passes)
    identity = _identity(source.text, source.filename, options, passes, transform_options)
    compiled = _COMPILED.get(identity) if identity is not None else None
    if compiled is None:
        compiled = compile_checked(checked, options, passes, transform_options=transform_options)
        if identity is not None:
            _COMPILED[identity] = compiled
    return Optimizer(
        compiled,
        hypers | transform_options.hyperparams(compiled.program),
        transform_options,
        pack,
        identity,
        lowering,
    )


@functools.lru_cache(maxsize=256)
def _check(text: str, filename: str) -> CheckedSpec:
    return check(parse(text, filename))


def _identity(text: str, filename: str, options: dict, passes, transform_options: TransformOptions):
    """A hashable key for everything a compilation depends on, or None (a pytree ``mask``)."""
    key = (
        text,
        filename,
        tuple(sorted(options.items())),
        passes,
        tuple(sorted(transform_options.settings.items())),
    )
    try:
        hash(key)
    except TypeError:
        return None
    return key


def split_kwargs(checked: CheckedSpec, kwargs: dict[str, Any]) -> tuple[dict, dict]:
    """Sort ``optgen.load`` keyword arguments into the spec's options and hyperparameters."""
    options, hypers = {}, dict(checked.hypers)
    for key, value in kwargs.items():
        if key in checked.options:
            options[key] = value
        elif key in checked.hypers:
            hypers[key] = value
        else:
            known = [*checked.hypers, *checked.options, *TRANSFORM_OPTIONS]
            raise InputError(
                f"'{checked.name}' has no hyperparameter or option '{key}'",
                hint=did_you_mean(key, known) or f"it takes: {', '.join(known)}",
                code="E302",
            )
    return options, hypers


def from_config(config: dict[str, Any]) -> Optimizer:
    """The optimizer ``get_config`` described (built-in spec, or the same file, unchanged)."""
    config = dict(config)
    spec = config.pop("spec")
    digest = config.pop("sha256", None)
    if digest is not None and spec_digest(read_spec(spec).text) != digest:
        raise SpecError(
            f"'{spec}' has changed since this config was written (its SHA-256 differs)",
            hint="rebuild the optimizer from the spec as it is now with optgen.load",
            code="E349",
        )
    hypers = {
        name: schedules.from_config(v) if isinstance(v, dict) else v
        for name, v in config.pop("hyperparameters", {}).items()
    }
    return load(
        spec,
        passes=tuple(config.pop("passes", DEFAULT_PIPELINE)),
        pack=config.pop("pack", False),
        lowering=config.pop("lowering", "auto"),
        **hypers,
        **config.pop("options", {}),
        **config.pop("transforms", {}),
    )
