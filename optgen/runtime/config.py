"""An optimizer as a plain dict, and back: ``opt.get_config()`` and ``optgen.from_config(cfg)``.

The dict names the spec (a built-in name, or a file path with the SHA-256 of its text,
checked when it is read back), and holds the hyperparameters, the spec's options, the
transform options (``clipnorm``, ``use_ema``, ...) and the pass pipeline. Numbers,
named schedules (``optgen.schedules``) and strings serialize; a Python callable (a
hand-written schedule, a callable ``mask``) or a pytree ``mask`` cannot, and
``get_config`` says so.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from optgen import schedules
from optgen.diagnostics import SpecError
from optgen.library import builtin_names, read_spec

if TYPE_CHECKING:
    from optgen.runtime.optimizer import Optimizer


def get_config(opt: Optimizer) -> dict[str, Any]:
    """``opt`` as a plain dict of numbers, strings, lists and dicts."""
    source = opt.compiled.checked.spec.source
    name = (
        source.filename[: -len(".spec")] if source.filename.endswith(".spec") else source.filename
    )
    if name in builtin_names() and read_spec(name).text == source.text:
        spec = {"spec": name}
    else:
        spec = {"spec": source.filename, "sha256": spec_digest(source.text)}
    transforms = dict(opt.transform_options.settings)
    if "mask" in transforms:
        raise SpecError(
            "get_config cannot write down a mask (a pytree or a Python callable)",
            hint="use exclude_from_weight_decay (name fragments), which serializes",
            code="E348",
        )
    for name in ("exclude_from_weight_decay", "include_in_weight_decay"):
        if name in transforms:
            transforms[name] = list(transforms[name])
    spec_hypers = opt.compiled.checked.hypers
    return spec | {
        "hyperparameters": {
            name: _value(name, value)
            for name, value in opt.hyperparams.items()
            if name in spec_hypers
        },
        "options": dict(opt.compiled.options),
        "transforms": transforms,
        "passes": list(opt.compiled.passes),
        "pack": opt.pack,
        "lowering": opt.lowering,
    }


def spec_digest(text: str) -> str:
    """The SHA-256 of a spec's text, as a config records it."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _value(name: str, value):
    if isinstance(value, schedules.Schedule):
        return value.config()
    if callable(value):
        raise SpecError(
            f"get_config cannot write down '{name}': it is a Python callable",
            hint="use a named schedule from optgen.schedules (cosine_decay, ...), which serializes",
            code="E348",
        )
    return float(value)
