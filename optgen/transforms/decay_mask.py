"""exclude_from_weight_decay, include_in_weight_decay and mask: weight decay only where selected.

A spec's weight decay is its hyperparameter named ``weight_decay`` (the name Keras,
optax and torch all use) or ``weight_decay_rate`` (TF Model Garden's). The transform
adds a per-parameter input ``weight_decay_mask`` (1 where decay applies, 0 where it
does not) and replaces every use of that hyperparameter in the update by
``weight_decay * weight_decay_mask``. The runtime fills the mask from the parameters
(see :func:`leaf_mask`):

- ``exclude_from_weight_decay``: name fragments, as Keras's ``var_names``: a parameter
  whose key path (``"encoder/dense/bias"``) matches any of them (``re.search``) gets no decay;
- ``include_in_weight_decay``: name fragments, as TF Model Garden's: a parameter that
  matches any of them is decayed even when it matches an exclude fragment (alone,
  without exclude fragments, it changes nothing: every parameter is decayed);
- ``mask``: as optax's: a pytree of booleans shaped like the parameters, or a callable
  of the parameters returning one; ``True`` means decay.

Per parameter: ``decay = (included or not excluded) and mask``.
"""

from __future__ import annotations

import re

import jax
import numpy as np

from optgen.diagnostics import SpecError
from optgen.ir import Program
from optgen.transforms.edit import Editor, replace_update
from optgen.transforms.option import anything, as_fragments, fragments

NAME = "weight_decay_mask"
DECAY_NAMES = ("weight_decay", "weight_decay_rate")  # Keras, optax, torch; TF Model Garden
FRAGMENTS = ("exclude_from_weight_decay", "include_in_weight_decay")
OPTIONS = (*(fragments(name) for name in FRAGMENTS), anything("mask"))


def normalize(settings: dict) -> dict:
    """Fragments as tuples (a comma-separated string is the CLI's ``--with`` form)."""
    return {
        name: as_fragments(value) if name in FRAGMENTS else value
        for name, value in settings.items()
    }


def enabled(options) -> bool:
    """Is weight decay selected per parameter (exclude or include fragments, or a mask)?"""
    return any(options[name] for name in FRAGMENTS) or options["mask"] is not None


def leaf_inputs(options, params) -> dict[str, list]:
    """The mask's per-parameter input: 1.0 where weight decay applies, 0.0 where it does not."""
    keep = leaf_mask(
        params,
        options["exclude_from_weight_decay"],
        options["include_in_weight_decay"],
        options["mask"],
    )
    return {NAME: [np.float32(k) for k in keep]}


def apply(program: Program, options) -> Program:
    ed = Editor(program.update, "exclude_from_weight_decay")
    name = next((name for name in DECAY_NAMES if ed.has_input(name)), None)
    if name is None:
        raise SpecError(
            f"'{program.update.name}' has no hyperparameter 'weight_decay' to mask",
            hint="exclude_from_weight_decay, include_in_weight_decay and mask act on the "
            "hyperparameter named weight_decay (or weight_decay_rate); the spec must declare "
            "'hyper weight_decay = ...'",
            code="E343",
        )
    decay = ed.op("mul", ed.input(name), ed.add_input(NAME, "leaf"))
    return replace_update(program, ed.finish(ed.body({name: decay})), "exclude_from_weight_decay")


def key_path_name(path) -> str:
    """``"encoder/dense/bias"`` for a pytree key path (dict keys, sequence indices, attributes)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def leaf_mask(
    params, exclude: tuple[str, ...] | None, include: tuple[str, ...] | None, mask
) -> list[bool]:
    """Per parameter leaf: does weight decay apply?"""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [key_path_name(path) for path, _ in with_paths]
    keep = [matches(include, name) or not matches(exclude, name) for name in names]
    if mask is not None:
        given = mask(params) if callable(mask) else mask
        try:
            flags = treedef.flatten_up_to(given)
        except (ValueError, TypeError) as err:
            raise SpecError(
                f"mask does not have the structure of the parameters: {err}",
                hint="give a pytree of booleans shaped like the parameters, or a callable of the "
                "parameters that returns one",
                code="E344",
            ) from None
        keep = [k and bool(f) for k, f in zip(keep, flags, strict=True)]
    return keep


def matches(fragments: tuple[str, ...] | list[str] | None, name: str) -> bool:
    """Does any fragment match ``name`` (``re.search``, one fragment at a time, as Keras and TF
    Model Garden)?
    """
    return any(re.search(fragment, name) is not None for fragment in fragments or ())
