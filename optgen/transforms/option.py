"""How an option every spec takes declares itself: name, default, the values it takes, and
whether it becomes a hyperparameter (with the range the runtime holds it to at every step).

A transform module lists its options in ``OPTIONS`` (built with the helpers here) and
defines ``enabled(options)`` and ``apply(program, options)``; it may define
``check(settings)`` for rules across its options and ``leaf_inputs(options, params)`` for
per-parameter inputs. :mod:`optgen.transforms` collects them.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from optgen.diagnostics import SpecError
from optgen.syntax import Range


@dataclass(frozen=True)
class Option:
    name: str
    default: Any  # None or False: the transform is off
    # raises SpecError (E342) for a value the option does not take
    validate: Callable[[str, Any], None]
    hyper_range: Range | None = None  # a hyperparameter of the same name, kept in this range

    @property
    def hyper(self) -> bool:
        return self.hyper_range is not None


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _refuse(name: str, takes: str, value, hint: str | None = None):
    raise SpecError(f"{name} takes {takes}, got {value!r}", hint=hint, code="E342")


def positive(name: str) -> Option:
    """A finite positive number, off by default (``clipnorm``): inf would turn every parameter into
    nan.
    """

    def validate(name, value):
        if not (_number(value) and value > 0):
            _refuse(
                name, "a finite positive number", value, f"to turn {name} off, leave it out (None)"
            )

    return Option(name, None, validate, Range(0.0, math.inf, True, True, None))


def boolean(name: str) -> Option:
    def validate(name, value):
        if not isinstance(value, bool):
            _refuse(name, "true or false", value)

    return Option(name, False, validate)


def fraction(name: str, default: float) -> Option:
    """A number in [0, 1] (``ema_momentum``)."""

    def validate(name, value):
        if not (_number(value) and 0 <= value <= 1):
            _refuse(name, "a number in [0, 1]", value)

    return Option(name, default, validate, Range(0.0, 1.0, False, False, None))


def integer_at_least(name: str, low: int) -> Option:
    """An integer ``>= low``, off by default (``gradient_accumulation_steps``)."""

    def validate(name, value):
        if not (_number(value) and float(value).is_integer() and value >= low):
            _refuse(name, f"an integer >= {low}", value, "as in Keras")

    return Option(name, None, validate, Range(float(low), math.inf, False, True, None))


def fragments(name: str) -> Option:
    """Name fragments matched with ``re.search``: a list of strings, or one
    comma-separated string.
    """

    def validate(name, value):
        if not (isinstance(value, str) or all(isinstance(v, str) for v in value)):
            _refuse(name, "name fragments (strings)", value, f"for example {name}=['bias', 'norm']")
        for fragment in as_fragments(value):
            try:  # matched with re.search, as Keras's var_names are
                re.compile(fragment)
            except re.error as err:
                raise SpecError(
                    f"{name} fragment {fragment!r} is not a valid pattern: {err}",
                    hint="escape special characters, e.g. re.escape('bias(')",
                    code="E342",
                ) from None

    return Option(name, None, validate)


def anything(name: str) -> Option:
    """Checked where it is used (a pytree or callable ``mask``)."""
    return Option(name, None, lambda name, value: None)


def as_fragments(value) -> tuple[str, ...]:
    """Name fragments as a tuple: a list of strings, or one comma-separated string (the CLI's
    ``--with``).
    """
    return tuple(value.split(",") if isinstance(value, str) else value)
