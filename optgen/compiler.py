"""The front door: spec name or path -> checked spec -> IR -> optimized IR."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from optgen.checker import CheckedSpec, check
from optgen.ir import Function, Program
from optgen.library import builtin_names, read_spec
from optgen.lower import lower_spec, resolve_options
from optgen.parser import parse
from optgen.passes import DEFAULT_PIPELINE, known_passes, run_pipeline
from optgen.transforms import DEFAULTS as SHARED_OPTIONS
from optgen.transforms import TransformOptions


@dataclass(frozen=True)
class Compiled:
    """A spec compiled to IR: what the runtime and every ``--emit`` stage start from."""

    checked: CheckedSpec
    options: dict[str, bool]
    lowered: Program  # before any pass (transforms applied)
    program: Program  # after the pipeline
    passes: tuple[str, ...] = DEFAULT_PIPELINE


def check_spec(name_or_path: str) -> CheckedSpec:
    """Read, parse and check a built-in spec or a spec file."""
    source = read_spec(name_or_path)
    return check(parse(source.text, source.filename))


def user_warnings(name_or_path: str, checked: CheckedSpec) -> tuple:
    """The checker's warnings (W codes) worth showing: a spec file's; none for a built-in spec,
    whose accepted warnings are listed with their reasons in tests/test_hazards.py."""
    return () if name_or_path in builtin_names() else checked.warnings


def compile_checked(
    checked: CheckedSpec,
    options: dict[str, object] | None = None,
    passes: Iterable[str] = DEFAULT_PIPELINE,
    after_each: Callable[[str, Function], None] | None = None,
    transform_options: TransformOptions = TransformOptions(),
) -> Compiled:
    """Lower and optimize a checked spec.

    ``options`` overrides the spec's ``option`` defaults; ``transform_options`` holds the
    options that are transforms (``clipnorm``, ``use_ema``, ...), applied right after
    lowering; ``passes`` names the passes to run (both the update and init functions
    go through them); ``after_each`` is called with each pass's name and output, for
    ``--print-ir-after-all``.
    """
    resolved = resolve_options(checked, options or {}, tuple(SHARED_OPTIONS))
    lowered = transform_options.apply(lower_spec(checked, resolved))
    passes = known_passes(passes)
    program = replace(
        lowered,
        update=run_pipeline(lowered.update, passes, after_each),
        init=run_pipeline(lowered.init, passes, after_each),
        derived=lowered.derived and run_pipeline(lowered.derived, passes, after_each),
    )
    return Compiled(checked, resolved, lowered, program, passes)
