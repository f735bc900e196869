"""The ``optgen`` command: compile, inspect, check, list and show specs; run passes over IR text.

Every user mistake ends as ``file:line:col: error: ...`` on stderr with exit status 1;
``-o`` writes atomically, so on any error nothing is written.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys

import click
import jax

from optgen import __version__
from optgen import opt as ir_opt
from optgen import passes as passes_mod
from optgen.artifact import save_artifact
from optgen.atomic import write_atomic
from optgen.codegen import export, fusion
from optgen.compiler import check_spec as _check_spec
from optgen.compiler import compile_checked, user_warnings
from optgen.diagnostics import Diagnostic, InputError, SpecError
from optgen.ir import print_function, print_program
from optgen.library import builtin_names, read_spec
from optgen.syntax import format_spec
from optgen.transforms import DEFAULTS, TransformOptions, split_options
from optgen.types import DTYPES

EMITS = ("ast", "ir", "ir-opt", "stablehlo", "hlo", "artifact")
# compile and inspect take the parameters' dtype and the options alike
_WITH_OPTION = click.option(
    "--with",
    "with_",
    multiple=True,
    metavar="NAME=VALUE",
    help="Set an option: the spec's, or one every spec takes (global_clipnorm=1.0, use_ema=true).",
)
_DTYPE_OPTION = click.option(
    "--dtype",
    type=click.Choice(["f32", "bf16", "f16", "f64"]),
    default="f32",
    show_default=True,
    help="Parameter dtype of the kernel.",
)
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def check_spec(spec: str):
    """Read, parse and check SPEC; print the warnings (W codes) a spec file gets to stderr."""
    checked = _check_spec(spec)
    for warning in user_warnings(spec, checked):
        click.echo(warning.render(), err=True)
    return checked


def _parse_with(values: tuple[str, ...]) -> tuple[dict[str, object], TransformOptions]:
    """``--with`` items: the spec's options, and the options every spec takes (transforms)."""
    options = {}
    for item in values:
        name, sep, text = item.partition("=")
        if not sep or not text.strip():
            raise SpecError(
                f"--with takes NAME=VALUE, got '{item}'",
                hint="for example: --with nesterov=true, --with global_clipnorm=1.0",
                code="E009",
            )
        options[name.strip()] = _with_value(text.strip())
    transform_options, options = split_options(options)
    return options, transform_options


def _parse_state_dtypes(values: tuple[str, ...]) -> dict[str, str]:
    """``--state-dtype`` items: a per-element state's name (or ``*``) and a storage dtype."""
    chosen = {}
    for item in values:
        name, sep, dtype = (part.strip() for part in item.partition("="))
        if not sep or not name or dtype not in ("f32", "bf16", "f16"):
            raise InputError(
                f"--state-dtype takes NAME=DTYPE with DTYPE f32, bf16 or f16, got '{item}'",
                hint="for example: --state-dtype mu=bf16, or '*=bf16' for every state",
                code="E411",
            )
        chosen[name] = dtype
    return chosen


def _with_value(text: str) -> object:
    """true/false, a number, or else the text itself (e.g. exclude_from_weight_decay=bias,norm)."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        number = float(text)
    except ValueError:
        return text
    return (
        int(number)
        if number.is_integer() and "." not in text and "e" not in text.lower()
        else number
    )


def _shape(text: str) -> str:
    """``--shape``: comma-separated dims, each a size (0 to 2^40) or a symbolic name like ``n``
    (ASCII only: ``int`` and JAX's shape parser disagree about other digits, such as ``²``;
    and a name JAX's parser takes, so not ``_``, ``max``, ``min``, ``mod`` or ``floordiv``)."""
    dims = [d.strip() for d in text.split(",")] if text.strip() else []
    for dim in dims:
        size = re.fullmatch(r"[0-9]+", dim) and int(dim) <= 1 << 40
        if not (size or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", dim) and _symbolic(dim)):
            raise SpecError(
                f"--shape takes sizes or symbolic names separated by commas, got '{text}'",
                hint="for example: --shape n, --shape 1048576 or --shape 128,256",
                code="E014",
            )
    return ",".join(dims)


def _symbolic(name: str) -> bool:
    try:
        jax.export.symbolic_shape(name)
    except ValueError:  # '_' and '...' are JAX's wildcards; max, min, mod, floordiv its functions
        return False
    return True


def _platforms(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise SpecError(
            "--platforms names no platform", hint=f"choose from {', '.join(PLATFORMS)}", code="E010"
        )
    for name in names:
        if name not in PLATFORMS:
            raise SpecError(
                f"unknown platform '{name}'",
                hint=f"choose from {', '.join(PLATFORMS)}",
                code="E010",
            )
    return names


class _Group(click.Group):
    """Turns a Diagnostic from any command into its rendering and exit status 1, Ctrl-C into 130."""

    def invoke(self, ctx):
        try:
            result = super().invoke(ctx)
            _flush_stdout()
            return result
        except Diagnostic as err:
            click.echo(err.render(), err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("optgen: interrupted; nothing was written", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="optgen")
def main():
    """optgen: compile optimizer specs to fused XLA kernels."""


@main.command()
@click.argument("spec")
@click.option("-o", "--output", metavar="FILE", help="Write here (atomically) instead of stdout.")
@click.option(
    "--emit",
    type=click.Choice(EMITS),
    default="stablehlo",
    show_default=True,
    help="The stage to stop after.",
)
@_DTYPE_OPTION
@click.option(
    "--shape",
    default="n",
    show_default=True,
    help="Kernel shape: dims separated by commas, numbers or symbolic names.",
)
@click.option(
    "--platforms",
    default="cpu,cuda,rocm,tpu",
    show_default=True,
    help="Platforms of an --emit artifact.",
)
@click.option(
    "--passes", metavar="LIST", help="Comma-separated passes instead of the default pipeline."
)
@_WITH_OPTION
@click.option("--print-ir-after-all", is_flag=True, help="Print the IR after each pass to stderr.")
def compile(spec, output, emit, dtype, shape, platforms, passes, with_, print_ir_after_all):
    """Compile SPEC (a built-in name or a .spec file) and print the chosen stage."""
    (options, transform_options), shape = _parse_with(with_), _shape(shape)
    pipeline = (
        passes_mod.parse_pipeline(passes) if passes is not None else passes_mod.DEFAULT_PIPELINE
    )
    if emit == "artifact" and not output:
        raise SpecError("--emit artifact writes a binary file", hint="give -o FILE", code="E011")
    checked = check_spec(spec)
    if emit == "ast":
        return _write(output, format_spec(checked.spec))

    def after_each(name, func):
        click.echo(f"// ----- IR after {name} -----\n{print_function(func)}", err=True)

    compiled = compile_checked(
        checked, options, pipeline, after_each if print_ir_after_all else None, transform_options
    )
    dims = shape.split(",")
    if compiled.program.factoring.enabled and len(dims) > 1 and not all(d.isdigit() for d in dims):
        raise SpecError(
            f"{checked.name} has row and column state, so --shape needs sizes, not names (got "
            f"{shape})",
            hint="which axes are factored depends on the sizes (min_dim_size_to_factor): give "
            "numbers, e.g. --shape 256,512, or one dim (--shape n)",
            code="E016",
        )
    if emit in ("ir", "ir-opt"):
        return _write(output, print_program(compiled.lowered if emit == "ir" else compiled.program))
    if emit == "artifact":
        save_artifact(output, compiled, dtype, shape, _platforms(platforms))
        return click.echo(f"wrote {output}", err=True)
    if emit == "hlo" and not all(d.isdigit() for d in shape.replace(" ", "").split(",")):
        raise SpecError(
            "--emit hlo compiles for this machine and needs a concrete shape",
            hint="give one, e.g. --shape 1048576",
            code="E012",
        )
    emitter = export.stablehlo_text if emit == "stablehlo" else export.optimized_hlo
    _write(output, emitter(compiled.program, DTYPES[dtype], shape))


@main.command()
@click.argument("spec")
@_DTYPE_OPTION
@click.option(
    "--elements",
    type=click.IntRange(min=1),
    default=1 << 24,
    show_default=True,
    help="Parameter elements (one flat tensor).",
)
@click.option(
    "--lowering",
    type=click.Choice(fusion.LOWERINGS),
    default="auto",
    show_default=True,
    help="How outputs are lowered (see docs/fusion.md).",
)
@click.option(
    "--run", is_flag=True, help="Also time the step and a copy of the same size on this machine."
)
@_WITH_OPTION
@click.option(
    "--state-dtype",
    "state_dtypes",
    multiple=True,
    metavar="NAME=DTYPE",
    help="Store a per-element state in f32, bf16 or f16 (NAME * for every one).",
)
def inspect(spec, dtype, elements, lowering, run, with_, state_dtypes):
    """Report what XLA made of SPEC: kernels, bytes and flops per element, speed."""
    # imports jax's compiler only when asked
    from optgen.kernel_report import inspect as inspect_step
    from optgen.kernel_report import with_state_dtypes

    options, transform_options = _parse_with(with_)
    compiled = compile_checked(check_spec(spec), options, transform_options=transform_options)
    program = with_state_dtypes(compiled.program, _parse_state_dtypes(state_dtypes))
    report = inspect_step(program, DTYPES[dtype], elements, lowering, run)
    print_out(
        "".join(
            [
                f"{spec} step, {dtype}, on {jax.devices()[0].device_kind}\n",
                *(f"  {line}\n" for line in report.lines()),
            ]
        )
    )


@main.command()
@click.argument("spec")
@click.option(
    "--with",
    "with_",
    multiple=True,
    metavar="NAME=VALUE",
    help="Check with an option set (as compile's --with).",
)
def check(spec, with_):
    """Parse and check SPEC; print "ok" or the first error."""
    options, transform_options = _parse_with(with_)
    compile_checked(check_spec(spec), options, passes=(), transform_options=transform_options)
    print_out(f"{spec}: ok\n")


# "\b" keeps click from rewrapping the list
_PASS_LIST = "\b\nPasses:\n" + "\n".join(f"  {line}" for line in passes_mod.SUMMARIES.values())


@main.command("opt", epilog=_PASS_LIST)
@click.argument("file")
@click.option(
    "--passes",
    metavar="LIST",
    default="",
    help="Comma-separated passes to run, in order (none: print the IR again).",
)
@click.option(
    "--split-input-file",
    is_flag=True,
    help="Handle each piece between '// -----' lines on its own.",
)
@click.option(
    "--with",
    "with_",
    multiple=True,
    metavar="NAME=VALUE",
    help="Apply an option every spec takes (clipnorm=1.0, use_ema=true) first.",
)
@click.option("-o", "--output", metavar="FILE", help="Write here (atomically) instead of stdout.")
def opt(file, passes, split_input_file, with_, output):
    """Run passes over the IR text in FILE (- for stdin) and print the IR they give."""
    pipeline = passes_mod.parse_pipeline(passes)
    spec_options, transform_options = _parse_with(with_)
    if spec_options:
        raise SpecError(
            f"--with {', '.join(spec_options)}: IR text has no spec, so only the options every "
            "spec takes apply",
            hint="those are: " + ", ".join(DEFAULTS),
            code="E034",
        )
    source = ir_opt.read_ir(file)
    _write(output, ir_opt.optimize_source(source, pipeline, split_input_file, transform_options))


@main.command("list")
def list_specs():
    """List the built-in specs with their descriptions."""
    names = builtin_names()
    width = max(map(len, names), default=0)
    print_out("".join(f"{name:<{width}}  {_check_spec(name).spec.description}\n" for name in names))


@main.command()
@click.argument("name")
def show(name):
    """Print a built-in spec's source."""
    print_out(read_spec(name).text)


def _write(output: str | None, text: str) -> None:
    if output:
        write_atomic(output, text)
    else:
        print_out(text)


def print_out(text: str) -> None:
    """Write to standard output; a closed, full or broken one is a diagnostic (E017), not a
    traceback.
    """
    if sys.stdout is None:  # the command was started with its standard output closed
        raise SpecError(
            "standard output is closed, so there is nowhere to print to",
            hint="redirect it (> FILE), or give -o FILE where the command takes one",
            code="E017",
        )
    try:
        sys.stdout.write(text)
    except OSError as err:
        _stdout_failed(err)
    _flush_stdout()


def _flush_stdout() -> None:
    if sys.stdout is not None:
        try:
            sys.stdout.flush()
        except OSError as err:
            _stdout_failed(err)


def _stdout_failed(err: OSError):
    # Point the descriptor at /dev/null so Python's own flush at exit finds nothing to fail on.
    with contextlib.suppress(Exception):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SpecError(
        f"cannot write to standard output: {err.strerror or err}",
        hint="check the disk or the pipe it goes to, or give -o FILE",
        code="E017",
    ) from None


from optgen.search.cli import mutate, search  # noqa: E402  (their own module; they import only on use)

main.add_command(mutate)
main.add_command(search)

if __name__ == "__main__":
    main()
