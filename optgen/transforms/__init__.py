"""Options that apply to any spec, each a transform of the lowered IR.

A transform takes any optimizer's program (update and init functions) and returns the
variant: ``clipnorm`` adds a clip before the update, ``use_ema`` a moving average
after it, and so on. They run after lowering and before the pass pipeline, so the
variant shows in ``optgen compile --emit ir`` and is fused into the same kernel.

The options take Keras's names and defaults (``keras.optimizers.Optimizer``), plus
optax's ``mask`` and ``skip_nonfinite`` (``optax.apply_if_finite``). Numbers among them
become hyperparameters of the same name (``clipnorm``, ``ema_momentum``, ...): they
live in the optimizer state and change without recompiling.

Transforms wrap each other in one fixed order, innermost first: weight-decay mask,
clip, accumulation, EMA, skip_nonfinite, loss scale. This is Keras's order (unscale,
accumulate, clip, update, average); a non-finite gradient is skipped before it is
accumulated.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from optgen.diagnostics import SpecError
from optgen.ir import Program
from optgen.transforms import accumulate, clip, decay_mask, ema, loss_scale, skip_nonfinite

# Keras's names and defaults, and optax's mask; None or False leaves a transform off.
DEFAULTS: dict[str, Any] = {
    "clipnorm": None, "clipvalue": None, "global_clipnorm": None,
    "use_ema": False, "ema_momentum": 0.99, "ema_overwrite_frequency": None,
    "loss_scale_factor": None, "gradient_accumulation_steps": None,
    "exclude_from_weight_decay": None, "mask": None, "skip_nonfinite": False,
}
_POSITIVE = ("clipnorm", "clipvalue", "global_clipnorm", "loss_scale_factor")
_BOOLS = ("use_ema", "skip_nonfinite")


@dataclass(frozen=True)
class Variant:
    """The transform options an optimizer was built with (only those not at their default)."""

    settings: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str):
        return self.settings.get(name, DEFAULTS[name])

    def apply(self, program: Program) -> Program:
        """``program`` with every transform these settings turn on, innermost first."""
        if self["exclude_from_weight_decay"] or self["mask"] is not None:
            program = decay_mask.apply(program)
        for name in clip.RULES:
            if self[name] is not None:
                program = clip.apply(program, name)
        if self["gradient_accumulation_steps"] is not None:
            program = accumulate.apply(program)
        if self["use_ema"]:
            program = ema.apply(program, overwrite=self["ema_overwrite_frequency"] is not None)
        if self["skip_nonfinite"]:
            program = skip_nonfinite.apply(program)
        if self["loss_scale_factor"] is not None:
            program = loss_scale.apply(program)
        return program

    def hyperparams(self, program: Program) -> dict[str, float]:
        """The options that became hyperparameters of ``program`` (inputs named like them), with their values."""
        return {v.name: float(self[v.name]) for v in program.update.inputs if v.name in DEFAULTS}

    def leaf_inputs(self, params) -> dict[str, list]:
        """Per-parameter inputs of the variant: the weight-decay mask, 1.0 or 0.0 per leaf."""
        if not (self["exclude_from_weight_decay"] or self["mask"] is not None):
            return {}
        keep = decay_mask.leaf_mask(params, self["exclude_from_weight_decay"], self["mask"])
        return {decay_mask.NAME: [np.float32(k) for k in keep]}


def split_options(kwargs: dict[str, Any]) -> tuple[Variant, dict[str, Any]]:
    """Take the transform options out of ``kwargs``: a checked :class:`Variant`, and the rest."""
    settings = {k: v for k, v in kwargs.items() if k in DEFAULTS and not _is_default(k, v)}
    rest = {k: v for k, v in kwargs.items() if k not in DEFAULTS}
    for name, value in settings.items():
        _check(name, value)
    clips = [name for name in clip.RULES if name in settings]
    if len(clips) > 1:
        raise SpecError(f"only one of clipnorm, clipvalue and global_clipnorm can be set, got {', '.join(clips)}",
                        hint="as in Keras; chain optax.clip_by_global_norm in front for a second clip", code="E340")
    if ("ema_momentum" in settings or "ema_overwrite_frequency" in settings) and not settings.get("use_ema"):
        raise SpecError("ema_momentum and ema_overwrite_frequency need use_ema=True", code="E341")
    if isinstance(settings.get("exclude_from_weight_decay"), str):
        settings["exclude_from_weight_decay"] = tuple(settings["exclude_from_weight_decay"].split(","))
    elif "exclude_from_weight_decay" in settings:
        settings["exclude_from_weight_decay"] = tuple(settings["exclude_from_weight_decay"])
    return Variant(settings), rest


def _is_default(name: str, value) -> bool:
    default = DEFAULTS[name]
    return value is None if default is None else (value is default or value == default)


def _check(name: str, value) -> None:
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if name in _BOOLS and not isinstance(value, bool):
        raise SpecError(f"{name} takes true or false, got {value!r}", code="E342")
    if name in _POSITIVE and not (number and value > 0):
        raise SpecError(f"{name} takes a positive number, got {value!r}", code="E342")
    if name == "ema_momentum" and not (number and 0 <= value <= 1):
        raise SpecError(f"ema_momentum takes a number in [0, 1], got {value!r}", code="E342")
    integral = number and float(value).is_integer()
    if name == "gradient_accumulation_steps" and not (integral and value >= 2):
        raise SpecError(f"gradient_accumulation_steps takes an integer >= 2, got {value!r}", hint="as in Keras", code="E342")
    if name == "ema_overwrite_frequency" and not (integral and value >= 1):
        raise SpecError(f"ema_overwrite_frequency takes an integer >= 1, got {value!r}", hint="as in Keras", code="E342")
    if name == "exclude_from_weight_decay" and not (
            isinstance(value, str) or all(isinstance(v, str) for v in value)):
        raise SpecError("exclude_from_weight_decay takes name fragments (strings), "
                        f"got {value!r}", hint="for example exclude_from_weight_decay=['bias', 'norm']", code="E342")
    if name == "exclude_from_weight_decay":
        for fragment in value.split(",") if isinstance(value, str) else value:
            try:  # matched with re.search, as Keras's var_names are
                re.compile(fragment)
            except re.error as err:
                raise SpecError(f"exclude_from_weight_decay fragment {fragment!r} is not a valid pattern: {err}",
                                hint="escape special characters, e.g. re.escape('bias(')", code="E342") from None
