"""Learning-rate schedules by name: optax's schedule functions, serializable.

Any callable of the step count is a schedule (``optgen.load("adamw",
learning_rate=lambda count: ...)``); the ones here also have a name and their
arguments, so ``Optimizer.get_config`` can write them down and ``optgen.from_config``
rebuild them. Each evaluates exactly as the optax function of the same name (it calls
it), at ``state.count`` before the step (the number of calls so far, as Keras counts):

- ``constant(value)``: ``optax.constant_schedule``;
- ``cosine_decay(init_value, decay_steps, alpha=0.0, exponent=1.0)``:
  ``optax.cosine_decay_schedule``;
- ``warmup_cosine_decay(init_value, peak_value, warmup_steps, decay_steps, end_value=0.0,
  exponent=1.0)``: ``optax.warmup_cosine_decay_schedule``;
- ``exponential_decay(init_value, transition_steps, decay_rate, transition_begin=0, staircase=False,
  end_value=None)``: ``optax.exponential_decay``;
- ``piecewise_constant(init_value, boundaries_and_scales)``: ``optax.piecewise_constant_schedule``.
"""

from __future__ import annotations

from typing import Any

import optax

from optgen.diagnostics import SpecError, did_you_mean

_OPTAX = {
    "constant": optax.constant_schedule,
    "cosine_decay": optax.cosine_decay_schedule,
    "warmup_cosine_decay": optax.warmup_cosine_decay_schedule,
    "exponential_decay": optax.exponential_decay,
    "piecewise_constant": optax.piecewise_constant_schedule,
}


class Schedule:
    """A named schedule: callable of the step count, and ``config()`` to write it down."""

    def __init__(self, name: str, **kwargs: Any):
        if name not in _OPTAX:
            raise SpecError(
                f"unknown schedule '{name}'",
                hint=did_you_mean(name, _OPTAX) or f"the schedules are {', '.join(_OPTAX)}",
                code="E346",
            )
        if "boundaries_and_scales" in kwargs:  # JSON turns the integer keys into strings
            kwargs["boundaries_and_scales"] = {
                int(k): float(v) for k, v in kwargs["boundaries_and_scales"].items()
            }
        try:
            self._fn = _OPTAX[name](**kwargs)
        except TypeError as err:
            raise SpecError(
                f"schedule '{name}': {err}", hint=f"see optax.{_OPTAX[name].__name__}", code="E347"
            ) from None
        self.name, self.kwargs = name, kwargs

    def __call__(self, count):
        return self._fn(count)

    def __repr__(self) -> str:
        arguments = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"optgen.schedules.{self.name}({arguments})"

    def config(self) -> dict[str, Any]:
        return {"schedule": self.name, **self.kwargs}


def from_config(config: dict[str, Any]) -> Schedule:
    """The schedule ``Schedule.config()`` wrote down."""
    config = dict(config)
    return Schedule(config.pop("schedule"), **config)


def constant(value: float) -> Schedule:
    return Schedule("constant", value=value)


def cosine_decay(
    init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0
) -> Schedule:
    return Schedule(
        "cosine_decay",
        init_value=init_value,
        decay_steps=decay_steps,
        alpha=alpha,
        exponent=exponent,
    )


def warmup_cosine_decay(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
    exponent: float = 1.0,
) -> Schedule:
    return Schedule(
        "warmup_cosine_decay",
        init_value=init_value,
        peak_value=peak_value,
        warmup_steps=warmup_steps,
        decay_steps=decay_steps,
        end_value=end_value,
        exponent=exponent,
    )


def exponential_decay(
    init_value: float,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> Schedule:
    return Schedule(
        "exponential_decay",
        init_value=init_value,
        transition_steps=transition_steps,
        decay_rate=decay_rate,
        transition_begin=transition_begin,
        staircase=staircase,
        end_value=end_value,
    )


def piecewise_constant(init_value: float, boundaries_and_scales: dict[int, float]) -> Schedule:
    return Schedule(
        "piecewise_constant", init_value=init_value, boundaries_and_scales=boundaries_and_scales
    )
