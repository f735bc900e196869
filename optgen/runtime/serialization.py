"""Names for the state's pytree types, so that ``jax.export`` can serialize a train step.

``Exported.serialize()`` writes the calling convention of the exported function, its
input and output trees included, and refuses a NamedTuple it has no name for. optgen
names its :class:`~optgen.runtime.state.OptState` when it is imported;
:func:`register_optax_states` names optax's own state types (``optax.chain`` of
``optax.clip`` and an optgen optimizer carries both), which optax does not do itself.
"""

from __future__ import annotations

import jax

from optgen.runtime.state import OptState

_NAMED: set[type] = set()


def name_for_export(cls: type, serialized_name: str) -> None:
    """Register the NamedTuple ``cls`` with ``jax.export`` once (a second call does nothing)."""
    if cls in _NAMED:
        return
    try:
        jax.export.register_namedtuple_serialization(cls, serialized_name=serialized_name)
    except ValueError as err:  # someone (the user, or optax one day) named it already
        if "already" not in str(err):
            raise
    _NAMED.add(cls)


def register_optax_states() -> None:
    """Register every NamedTuple state type of ``optax`` and ``optax.contrib`` with
    ``jax.export``.
    """
    import optax
    import optax.contrib

    for module in (optax, optax.contrib):
        for name in dir(module):
            cls = getattr(module, name)
            if isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields"):
                name_for_export(cls, f"{module.__name__}.{name}")


name_for_export(OptState, "optgen.OptState")
