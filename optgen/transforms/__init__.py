"""Options that apply to any spec, each a transform of the lowered IR.

A transform takes any optimizer's program (update and init functions) and returns it
rewritten: ``clipnorm`` adds a clip before the update, ``use_ema`` a moving average
after it, and so on. They run after lowering and before the pass pipeline, so the
rewrite shows in ``optgen compile --emit ir`` and is fused into the same kernel.

The options take Keras's names and defaults (``keras.optimizers.Optimizer``), plus
optax's ``mask`` and ``skip_nonfinite`` (``optax.apply_if_finite``), TF Model
Garden's ``include_in_weight_decay``, torchao's stochastic rounding of bf16 stores
(``stochastic_rounding``) and torch-optimi's Kahan-compensated bf16 parameters
(``kahan_sum``). Numbers among them
become hyperparameters of the same name (``clipnorm``, ``ema_momentum``, ...): they
live in the optimizer state and change without recompiling.

Each transform is one module that declares its options (:mod:`optgen.transforms.option`:
name, default, the values it takes, and the range of those that become hyperparameters).
Transforms wrap each other in the order of :data:`TRANSFORMS`, innermost first:
weight-decay mask, clip, Kahan summation, accumulation, EMA, skip_nonfinite, loss scale.
This is Keras's order (unscale, accumulate, clip, update, average); a non-finite gradient is
skipped before it is accumulated. A spec may not declare a name that is one of these options
(E260): ``optgen.load(spec, ema_momentum=...)`` must mean one thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from optgen.ir import Program
from optgen.syntax import Range
from optgen.transforms import (
    accumulate,
    clip,
    decay_mask,
    ema,
    kahan_sum,
    loss_scale,
    skip_nonfinite,
    stochastic_rounding,
)
from optgen.transforms.option import Option

# innermost first; stochastic_rounding changes how the update's stores round, not its values;
# kahan_sum compensates the update's store of p, inside the transforms that gate p and state (a
# call that does not update leaves p and kahan_comp bit for bit)
TRANSFORMS = (
    decay_mask,
    clip,
    kahan_sum,
    accumulate,
    ema,
    skip_nonfinite,
    loss_scale,
    stochastic_rounding,
)
# Listed (in hints and docs) in Keras's order: clips, EMA, loss scale, accumulation, then the
# others.
_LISTED = (
    clip,
    ema,
    loss_scale,
    accumulate,
    decay_mask,
    skip_nonfinite,
    stochastic_rounding,
    kahan_sum,
)
OPTIONS: dict[str, Option] = {
    option.name: option for module in _LISTED for option in module.OPTIONS
}
# Keras's names and defaults, optax's mask and TF Model Garden's include fragments; None or False:
# off.
DEFAULTS: dict[str, Any] = {name: option.default for name, option in OPTIONS.items()}
# The options that become hyperparameters, and the values the runtime accepts for them.
HYPER_RANGES: dict[str, Range] = {
    name: option.hyper_range for name, option in OPTIONS.items() if option.hyper
}


@dataclass(frozen=True)
class TransformOptions:
    """The transform options an optimizer was built with (only those not at their default)."""

    settings: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str):
        return self.settings.get(name, DEFAULTS[name])

    def apply(self, program: Program) -> Program:
        """``program`` with every transform these settings turn on, innermost first."""
        for module in TRANSFORMS:
            if module.enabled(self):
                program = module.apply(program, self)
        return program

    def hyperparams(self, program: Program) -> dict[str, float]:
        """The options that became hyperparameters of ``program`` (inputs named like them), with
        their values.
        """
        return {
            v.name: float(self[v.name]) for v in program.update.inputs if v.name in HYPER_RANGES
        }

    def _with_leaf_inputs(self) -> list:
        return [m for m in TRANSFORMS if hasattr(m, "leaf_inputs") and m.enabled(self)]

    def has_leaf_inputs(self) -> bool:
        """Whether an enabled transform adds per-parameter inputs (looked up by path)."""
        return bool(self._with_leaf_inputs())

    def leaf_inputs(self, params) -> dict[str, list]:
        """Per-parameter inputs of these transforms (the weight-decay mask: 1.0 or 0.0 per leaf)."""
        inputs = {}
        for module in self._with_leaf_inputs():
            inputs |= module.leaf_inputs(self, params)
        return inputs


def split_options(kwargs: dict[str, Any]) -> tuple[TransformOptions, dict[str, Any]]:
    """Take the transform options out of ``kwargs``: a checked :class:`TransformOptions`, and
    the rest.
    """
    settings = {k: v for k, v in kwargs.items() if k in OPTIONS and not _is_default(k, v)}
    rest = {k: v for k, v in kwargs.items() if k not in OPTIONS}
    for name, value in settings.items():
        OPTIONS[name].validate(name, value)
    for module in TRANSFORMS:
        if hasattr(module, "check"):
            module.check(settings)
    return TransformOptions(decay_mask.normalize(settings)), rest


def _is_default(name: str, value) -> bool:
    default = DEFAULTS[name]
    return value is None if default is None else (value is default or value == default)
