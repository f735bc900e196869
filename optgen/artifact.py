"""Serialized, portable kernels: ``optgen compile --emit artifact`` and :func:`load_artifact`.

The file is framed as every file optgen saves (:mod:`optgen.framing`): a one-line
magic with the format version, a SHA-256 of the rest, a one-line JSON header (spec,
dtype, shape, platforms, input and output names, hyperparameter defaults) and the
``jax.export`` bytes, which hold the StableHLO for every platform named at compile
time. The digest is checked before ``jax.export`` decodes anything: a flipped bit is
refused, never run.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optgen import framing
from optgen.codegen import export as export_kernel
from optgen.compiler import Compiled
from optgen.diagnostics import InputError, SpecError, did_you_mean
from optgen.types import DTYPES

MAGIC = b"OPTGEN-ARTIFACT 2\n"


def save_artifact(
    path: str, compiled: Compiled, dtype: str, shape: str, platforms: list[str]
) -> None:
    """Export the compiled update as a kernel on flat ``shape`` arrays and write it atomically."""
    program = compiled.program
    exported = export_kernel.export(program, DTYPES[dtype], shape, platforms)
    header = {
        "spec": compiled.checked.name,
        "dtype": dtype,
        "shape": shape,
        "platforms": platforms,
        "inputs": [v.name for v in program.update.inputs],
        "scalars": [v.name for v in program.update.inputs if v.type.extent == "step"],
        "outputs": [name for name, _ in program.update.outputs],
        "defaults": compiled.checked.hypers,
    }
    payload = exported.serialize()
    framing.write(path, MAGIC, header, lambda: (payload,))


class Artifact:
    """A loaded artifact. Call it with named arrays; get the named outputs back.

    ``artifact(p=p, g=g, mu=mu, nu=nu, t=1)`` runs one step; hyperparameters not
    given take the spec's defaults.
    """

    def __init__(self, header: dict[str, Any], exported: jax.export.Exported):
        self.header = header
        self.exported = exported

    def __repr__(self) -> str:
        h = self.header
        platforms = ",".join(h["platforms"])
        return f"<optgen.Artifact {h['spec']} {h['dtype']}[{h['shape']}] for {platforms}>"

    def __call__(self, **inputs) -> dict[str, jax.Array]:
        h = self.header
        unknown = set(inputs) - set(h["inputs"])
        if unknown:
            name = sorted(unknown)[0]
            raise SpecError(
                f"the {h['spec']} artifact has no input '{name}'",
                hint=did_you_mean(name, h["inputs"]) or f"its inputs are {', '.join(h['inputs'])}",
                code="E320",
            )
        values = {**h["defaults"], **inputs}
        missing = [name for name in h["inputs"] if name not in values]
        if missing:
            raise SpecError(
                f"the {h['spec']} artifact needs input '{missing[0]}'",
                hint=f"its inputs are {', '.join(h['inputs'])}",
                code="E321",
            )
        scalar_dtype = export_kernel.scalar_dtype(DTYPES[h["dtype"]])
        args = {
            n: jnp.asarray(values[n], scalar_dtype) if n in h["scalars"] else values[n]
            for n in h["inputs"]
        }
        with export_kernel.x64_for(DTYPES[h["dtype"]]):
            try:
                return self.exported.call(args)
            except (
                TypeError,
                ValueError,
            ) as err:
                # jax.export names the argument and what it expected
                raise InputError(
                    f"the {h['spec']} artifact's inputs do not fit: {err}",
                    hint=f"it was compiled for {h['dtype']}[{h['shape']}]",
                    code="E325",
                ) from None


def load_artifact(path: str) -> Artifact:
    """Read an artifact written by ``optgen compile --emit artifact``."""
    try:
        header, payload = framing.read(path, MAGIC)
    except framing.Unreadable as err:
        raise SpecError(f"cannot read artifact '{path}': {err}", code="E322") from None
    except framing.Foreign as err:
        raise SpecError(
            f"'{path}' is not an optgen artifact of format 2 (it starts {err})",
            hint="write one with: optgen compile SPEC --emit artifact -o FILE",
            code="E323",
        ) from None
    except framing.Damaged:
        raise SpecError(
            f"artifact '{path}' is truncated or altered (its content digest does not match)",
            hint="compile it again",
            code="E324",
        ) from None
    try:
        exported = jax.export.deserialize(bytearray(payload))
    except Exception as err:  # the digest matched, so this jax cannot read what another one wrote
        raise SpecError(
            f"artifact '{path}' cannot be decoded by this jax {jax.__version__} "
            f"({type(err).__name__})",
            hint="compile it again with this version",
            code="E324",
        ) from None
    return Artifact(header, exported)
