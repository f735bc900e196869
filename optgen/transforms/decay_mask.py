"""exclude_from_weight_decay and mask: weight decay only on the parameters the mask selects.

A spec's weight decay is its hyperparameter named ``weight_decay`` (the name Keras,
optax and torch all use). The transform adds a per-parameter input
``weight_decay_mask`` (1 where decay applies, 0 where it does not) and replaces every
use of ``weight_decay`` in the update by ``weight_decay * weight_decay_mask``. The
runtime fills the mask from the parameters (see :func:`leaf_mask`):

- ``exclude_from_weight_decay``: name fragments, as Keras's ``var_names``: a parameter
  whose key path (``"encoder/dense/bias"``) matches any of them (``re.search``) gets no decay;
- ``mask``: as optax's: a pytree of booleans shaped like the parameters, or a callable
  of the parameters returning one; ``True`` means decay.
"""

from __future__ import annotations

import re

import jax

from optgen.diagnostics import SpecError
from optgen.ir import Program
from optgen.transforms.edit import Editor, replace_update

NAME = "weight_decay_mask"


def apply(program: Program) -> Program:
    ed = Editor(program.update, "exclude_from_weight_decay")
    if not ed.has_input("weight_decay"):
        raise SpecError(f"'{program.update.name}' has no hyperparameter 'weight_decay' to mask",
                        hint="exclude_from_weight_decay and mask act on the hyperparameter named "
                             "weight_decay; the spec must declare 'hyper weight_decay = ...'", code="E343")
    decay = ed.op("mul", ed.input("weight_decay"), ed.add_input(NAME, "leaf"))
    return replace_update(program, ed.finish(ed.body({"weight_decay": decay})), "exclude_from_weight_decay")


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


def leaf_mask(params, exclude: tuple[str, ...] | None, mask) -> list[bool]:
    """Per parameter leaf: does weight decay apply?"""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    keep = [True] * len(with_paths)
    if exclude:
        pattern = re.compile("|".join(exclude))
        keep = [pattern.search(key_path_name(path)) is None for path, _ in with_paths]
    if mask is not None:
        given = mask(params) if callable(mask) else mask
        try:
            flags = treedef.flatten_up_to(given)
        except (ValueError, TypeError) as err:
            raise SpecError(f"mask does not have the structure of the parameters: {err}",
                            hint="give a pytree of booleans shaped like the parameters, "
                                 "or a callable of the parameters that returns one", code="E344") from None
        keep = [k and bool(f) for k, f in zip(keep, flags, strict=True)]
    return keep
