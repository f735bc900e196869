"""Saving and restoring an optimizer's state, bit for bit: :func:`save_state`, :func:`load_state`.

The file is three parts, written atomically (:mod:`optgen.atomic`)::

    OPTGEN-STATE 1\\n           magic and format version
    SHA-256 hex\\n              digest of everything after this line
    {JSON header}\\n            spec name and digest, every leaf's path, shape and dtype, byte order
    payload                    each leaf's bytes in C order, one after another

The spec digest covers the spec's text, the options it was compiled with and its
hyperparameter names, so a state saved by another optimizer (or another variant of
it) is refused. Any truncation or changed byte fails the content digest. Leaves are
stored as raw bytes with their NumPy dtype name, so bfloat16 (``ml_dtypes``) and every
other dtype round-trip exactly.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 and friends as NumPy dtype names)
import numpy as np

from optgen.runtime import packing, placement
from optgen.atomic import write_atomic
from optgen.diagnostics import InputError

if TYPE_CHECKING:
    from optgen.runtime.optimizer import Optimizer
    from optgen.runtime.state import OptState

MAGIC = b"OPTGEN-STATE 1\n"


def spec_digest(opt: "Optimizer") -> str:
    """SHA-256 of what decides a state's meaning: spec text, compiled options, hyperparameter names."""
    checked = opt.compiled.checked
    identity = {"source": checked.spec.source.text, "options": sorted(opt.compiled.options.items()),
                "hypers": sorted(opt.hyperparams)}
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def save_state(path: str, state: "OptState", opt: "Optimizer") -> None:
    """Write ``state`` of ``opt`` to ``path`` atomically (the old file stays whole on any error)."""
    # Stored as parameter-shaped trees, so leaf paths name parameters and packing is not baked in.
    flat, _ = jax.tree_util.tree_flatten_with_path(packing.unpack_state(state))
    arrays = [np.array(leaf, order="C") for _, leaf in flat]  # (ascontiguousarray makes 0-d arrays 1-d)
    payload = b"".join(a.tobytes() for a in arrays)
    header = {
        "spec": opt.name, "spec_digest": spec_digest(opt), "byteorder": sys.byteorder,
        "leaves": [[jax.tree_util.keystr(p), list(a.shape), a.dtype.name] for (p, _), a in zip(flat, arrays, strict=True)],
    }
    content = json.dumps(header).encode() + b"\n" + payload
    write_atomic(path, MAGIC + hashlib.sha256(content).hexdigest().encode() + b"\n" + content)


def load_state(path: str, opt: "Optimizer", params) -> "OptState":
    """Read a state saved by :func:`save_state` for ``opt`` and parameters shaped like ``params``.

    ``params`` (arrays or ``jax.ShapeDtypeStruct``) gives the tree to restore into; a file
    that is truncated, altered, from another spec or for other parameters is refused with
    an :class:`~optgen.diagnostics.InputError`. With arrays, the values are written into
    the buffers of a fresh ``opt.init(params)``: sharded, packed and placed as init makes
    them, and committed as ``step``'s outputs are.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise InputError(f"cannot read saved state '{path}': {err.strerror}", code="E330") from None
    if not data.startswith(MAGIC):
        version = data.split(b"\n", 1)[0][:40]
        raise InputError(f"'{path}' is not an optgen state file of format 1 (it starts {version!r})",
                         hint="write one with optgen.save_state", code="E331")
    digest, _, content = data[len(MAGIC):].partition(b"\n")
    if hashlib.sha256(content).hexdigest().encode() != digest:
        raise InputError(f"saved state '{path}' is truncated or altered (its content digest does not match)",
                         hint="restore it from a good copy", code="E332")
    header_line, _, payload = content.partition(b"\n")
    header = json.loads(header_line)  # the digest matched: this is the JSON save_state wrote
    if header.get("spec_digest") != spec_digest(opt):
        raise InputError(f"'{path}' holds state of spec '{header.get('spec')}' with other source, options or "
                         f"hyperparameters than this {opt.name}", hint="load it with the optimizer that saved it",
                         code="E333")
    concrete = all(placement.has_buffer(x) for x in jax.tree.leaves(params))
    # With real parameters the state is restored into a fresh init's buffers: sharded, packed and
    # placed as init makes them, and committed as step's outputs are (so step compiles once).
    template = opt.init(params) if concrete else jax.eval_shape(
        opt.init, jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params))
    flat, treedef = jax.tree_util.tree_flatten_with_path(jax.eval_shape(packing.unpack_state, template))
    want = [[jax.tree_util.keystr(p), list(x.shape), np.dtype(x.dtype).name] for p, x in flat]
    if header["leaves"] != want or header.get("byteorder") != sys.byteorder:
        diff = next((f"{g} saved, {w} expected" for g, w in zip(header["leaves"], want) if g != w),
                    f"{len(header['leaves'])} leaves saved, {len(want)} expected")
        raise InputError(f"'{path}' holds state for other parameters: {diff}",
                         hint="pass the params this state was saved with", code="E334")
    leaves, offset = [], 0
    for _, shape, dtype in want:
        array = np.frombuffer(payload, np.dtype(dtype), count=int(np.prod(shape)), offset=offset).reshape(shape)
        offset += array.nbytes
        leaves.append(jax.numpy.asarray(array))
    state = treedef.unflatten(leaves)
    state = state._replace(slots={name: packing.repack_like(template.slots[name], slot)
                                  for name, slot in state.slots.items()})
    return _into(template, state) if concrete else state


def _into(fresh, saved):
    """``saved``'s values written into ``fresh``'s buffers (donated), with ``fresh``'s shardings."""
    shardings = jax.tree.map(lambda x: x.sharding, fresh)
    return jax.jit(lambda _, values: values, donate_argnums=0, out_shardings=shardings)(fresh, saved)
