"""IR -> IR passes: one module each, registered by name, run alone or as a pipeline.

``run_pipeline(func, ["fold", "cse"])`` runs the named passes in order;
``DEFAULT_PIPELINE`` is what ``optgen.load`` and ``optgen compile`` use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from optgen.passes import canon, cse, dce, fold, hoist

from optgen.diagnostics import SpecError, did_you_mean
from optgen.ir import Function, verify

_MODULES = (canon, fold, cse, hoist, dce)
PASSES: dict[str, Callable[[Function], Function]] = {
    m.__name__.rsplit(".", 1)[1]: m.run for m in _MODULES
}
# One line per pass, from its module's docstring: "fold: evaluate ops whose operands ...".
SUMMARIES = {m.__name__.rsplit(".", 1)[1]: m.__doc__.splitlines()[0] for m in _MODULES}
DEFAULT_PIPELINE = ("canon", "fold", "cse", "hoist", "fold", "cse", "dce")


def parse_pipeline(text: str) -> tuple[str, ...]:
    """``"fold,cse"`` -> ``("fold", "cse")``; unknown names are a SpecError with a suggestion."""
    return known_passes(n.strip() for n in text.split(",") if n.strip())


def known_passes(names: Iterable[str]) -> tuple[str, ...]:
    """``names`` as a tuple; an unknown name (or a string instead of a list) is a SpecError."""
    names = (names,) if isinstance(names, str) else tuple(names)
    for name in names:
        if name not in PASSES:
            raise SpecError(
                f"unknown pass '{name}'",
                hint=did_you_mean(name, PASSES) or f"the passes are {', '.join(PASSES)}",
                code="E013",
            )
    return names


def run_pipeline(
    func: Function,
    names: Iterable[str] = DEFAULT_PIPELINE,
    after_each: Callable[[str, Function], None] | None = None,
) -> Function:
    """Run the named passes in order, verifying the IR after each one."""
    for name in known_passes(names):
        func = PASSES[name](func)
        verify(func)
        if after_each is not None:
            after_each(name, func)
    return func
