"""Saving and restoring an optimizer's state, bit for bit: :func:`save_state`, :func:`load_state`.

The file is framed as every file optgen saves (:mod:`optgen.framing`: magic and format
version, SHA-256, JSON header, payload) and written atomically::

    OPTGEN-STATE 1\\n           magic and format version
    SHA-256 hex\\n              digest of everything after this line
    {JSON header}\\n            spec name and digest, every leaf's path, shape and dtype, byte order
    payload                    each leaf's bytes in C order, one after another

The spec digest covers the spec's text, the options it was compiled with and its
hyperparameter names, so a state saved by another optimizer (or another variant of
it) is refused. Any truncation or changed byte fails the content digest. Leaves are
stored as raw bytes with their NumPy dtype name, so bfloat16 (``ml_dtypes``) and every
other dtype round-trip exactly. ``save_state`` checks the state against the optimizer
before it writes, so a wrong call never replaces a good file.
"""

from __future__ import annotations

import hashlib
import json
import sys

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 and friends as NumPy dtype names)
import numpy as np

from optgen import framing
from optgen.diagnostics import InputError
from optgen.runtime import packing, placement
from optgen.runtime.optimizer import Optimizer
from optgen.runtime.state import OptState

MAGIC = b"OPTGEN-STATE 1\n"


def spec_digest(opt: Optimizer) -> str:
    """SHA-256 of what decides a state's meaning: spec text, compiled options,
    hyperparameter names.
    """
    checked = opt.compiled.checked
    identity = {
        "source": checked.spec.source.text,
        "options": sorted(opt.compiled.options.items()),
        "hypers": sorted(opt.hyperparams),
    }
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def save_state(path: str, state: OptState, opt: Optimizer) -> None:
    """Write ``state`` of ``opt`` to ``path`` atomically (the old file stays whole on any error).

    ``state`` is checked against ``opt`` first (an :class:`~optgen.diagnostics.InputError`
    otherwise, and nothing is written). Leaves are copied to the host one at a time.
    """
    _check_state(state, opt)
    # Stored as parameter-shaped trees, so leaf paths name parameters and packing is not baked in.
    flat, _ = jax.tree_util.tree_flatten_with_path(packing.unpack_state(state))
    header = {
        "spec": opt.name,
        "spec_digest": spec_digest(opt),
        "byteorder": sys.byteorder,
        "leaves": [
            [jax.tree_util.keystr(p), list(np.shape(x)), np.dtype(x.dtype).name] for p, x in flat
        ],
    }

    def chunks():  # each leaf's bytes in C order (np.array: ascontiguousarray makes 0-d arrays 1-d)
        return (np.array(leaf, order="C").reshape(-1).view(np.uint8) for _, leaf in flat)

    framing.write(path, MAGIC, header, chunks)


def _check_state(state, opt) -> None:
    """Refuse a state that ``opt`` could not load back (a wrong argument, another optimizer's
    state).
    """
    if isinstance(state, Optimizer) and isinstance(opt, OptState):
        raise InputError(
            "save_state takes the state before the optimizer",
            hint="optgen.save_state(path, state, opt), as optgen.load_state(path, opt, params) "
            "reads it",
            code="E350",
        )
    if not isinstance(opt, Optimizer) or not isinstance(state, OptState):
        raise InputError(
            f"save_state takes an OptState and an optgen Optimizer, got {type(state).__name__} and "
            f"{type(opt).__name__}",
            hint="optgen.save_state(path, opt.init(params), opt)",
            code="E350",
        )
    hypers = sorted(opt.stored_hyperparams)
    if sorted(state.slots) != sorted(opt.state_names) or sorted(state.hyperparams) != hypers:
        raise InputError(
            f"this state is not {opt.name}'s: it holds hyperparameters {sorted(state.hyperparams)} "
            f"and states {sorted(state.slots)}; {opt.name} keeps {hypers} and "
            f"{sorted(opt.state_names)}",
            hint="save it with the optimizer whose init made it (nothing was written)",
            code="E311",
        )
    params = _params_of(state, opt)
    if params is not None:  # every leaf's shape and dtype, as step would check them
        opt.check(params, params, state)


def _params_of(state: OptState, opt: Optimizer):
    """The parameters' shapes and dtypes, read off a per-element state stored in their dtype (None
    if none is).
    """
    declared = opt.compiled.program.state_dtypes
    for name in opt.state_names:
        if opt.extents[name] == "tensor" and not declared.get(name):
            slot = packing.as_tree_shape(state.slots[name])
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), slot)
    return None


def load_state(path: str, opt: Optimizer, params) -> OptState:
    """Read a state saved by :func:`save_state` for ``opt`` and parameters shaped like ``params``.

    ``params`` (arrays or ``jax.ShapeDtypeStruct``) gives the tree to restore into; a file
    that is truncated, altered, from another spec or for other parameters is refused with
    an :class:`~optgen.diagnostics.InputError`. With arrays, the values are written into
    the buffers of a fresh ``opt.init(params)``: sharded, packed and placed as init makes
    them, and committed as ``step``'s outputs are.
    """
    try:
        header, payload = framing.read(path, MAGIC)
    except framing.Unreadable as err:
        raise InputError(f"cannot read saved state '{path}': {err}", code="E330") from None
    except framing.Foreign as err:
        raise InputError(
            f"'{path}' is not an optgen state file of format 1 (it starts {err})",
            hint="write one with optgen.save_state",
            code="E331",
        ) from None
    except framing.Damaged:
        raise InputError(
            f"saved state '{path}' is truncated or altered (its content digest does not match)",
            hint="restore it from a good copy",
            code="E332",
        ) from None
    if header.get("spec_digest") != spec_digest(opt):
        raise InputError(
            f"'{path}' holds state of spec '{header.get('spec')}' with other source, options or "
            f"hyperparameters than this {opt.name}",
            hint="load it with the optimizer that saved it",
            code="E333",
        )
    concrete = all(placement.has_buffer(x) for x in jax.tree.leaves(params))
    # With real parameters the state is restored into a fresh init's buffers: sharded, packed and
    # placed as init makes them, and committed as step's outputs are (so step compiles once).
    template = (
        opt.init(params)
        if concrete
        else jax.eval_shape(
            opt.init, jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
        )
    )
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        jax.eval_shape(packing.unpack_state, template)
    )
    want = [[jax.tree_util.keystr(p), list(x.shape), np.dtype(x.dtype).name] for p, x in flat]
    _check_leaves(path, opt, header, want)
    leaves, offset = [], 0
    for _, shape, dtype in want:
        array = np.frombuffer(
            payload, np.dtype(dtype), count=int(np.prod(shape)), offset=offset
        ).reshape(shape)
        offset += array.nbytes
        leaves.append(jax.numpy.asarray(array))
    state = treedef.unflatten(leaves)
    state = state._replace(
        slots={
            name: packing.repack_like(template.slots[name], slot)
            for name, slot in state.slots.items()
        }
    )
    return _into(template, state) if concrete else state


def _check_leaves(path: str, opt: Optimizer, header: dict, want: list) -> None:
    """The saved leaves are the ones ``want`` lists; otherwise say which part differs."""
    saved = header["leaves"]
    if saved == want and header.get("byteorder") == sys.byteorder:
        return
    slots = [
        sorted(
            {
                leaf[0].split("']")[0].removeprefix(".slots['")
                for leaf in leaves
                if leaf[0].startswith(".slots")
            }
        )
        for leaves in (saved, want)
    ]
    if slots[0] != slots[1]:
        raise InputError(
            f"'{path}' holds states {slots[0]}; this {opt.name} keeps {slots[1]} (an option every "
            "spec takes, such as use_ema or skip_nonfinite, adds or removes state)",
            hint="load it with the optimizer, options included, that saved it",
            code="E333",
        )
    hypers = [
        [leaf[0] for leaf in leaves if leaf[0].startswith(".hyperparams")]
        for leaves in (saved, want)
    ]
    if hypers[0] != hypers[1]:
        raise InputError(
            f"'{path}' holds hyperparameters {_names(hypers[0])} in its state; this {opt.name} "
            f"keeps {_names(hypers[1])} there (a schedule is computed from the step count and not "
            "stored; a constant is)",
            hint="load it with the same hyperparameters given as schedules or as constants as "
            "when it was saved",
            code="E351",
        )
    diff = next(
        (f"{g} saved, {w} expected" for g, w in zip(saved, want, strict=False) if g != w),
        f"{len(saved)} leaves saved, {len(want)} expected"
        if len(saved) != len(want)
        else f"saved with byte order {header.get('byteorder')}, this machine is {sys.byteorder}",
    )
    raise InputError(
        f"'{path}' holds state for other parameters: {diff}",
        hint="pass the params this state was saved with",
        code="E334",
    )


def _names(paths: list[str]) -> list[str]:
    return [p.removeprefix(".hyperparams['").removesuffix("']") for p in paths]


def _into(fresh, saved):
    """``saved``'s values written into ``fresh``'s buffers (donated), with ``fresh``'s shardings."""
    shardings = jax.tree.map(lambda x: x.sharding, fresh)
    return jax.jit(lambda _, values: values, donate_argnums=0, out_shardings=shardings)(
        fresh, saved
    )
