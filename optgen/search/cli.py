"""The ``optgen mutate`` and ``optgen search`` commands (registered in optgen/cli.py)."""

from __future__ import annotations

import random
from pathlib import Path

import click

from optgen.diagnostics import SpecError


@click.command()
@click.argument("spec")
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="random seed: the same seed prints the same variants",
)
@click.option(
    "-n",
    "count",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="how many variants",
)
@click.option(
    "--edits",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="mutations in each variant",
)
def mutate(spec, seed, count, edits):
    """Print random valid variants of SPEC (statements inserted, deleted or changed)."""
    from optgen.cli import check_spec, print_out
    from optgen.search.mutate import mutate as mutate_spec

    parsed = check_spec(spec).spec
    rng = random.Random(seed)
    for k in range(count):
        mutant = mutate_spec(parsed, rng, edits)
        print_out(
            f"{chr(10) if k else ''}# variant {k + 1} of {count} (--seed {seed}): "
            f"{'; '.join(mutant.edits)}\n" + mutant.text
        )


@click.command()
@click.option(
    "--seed-spec", default="adamw", show_default=True, help="the spec the search starts from"
)
@click.option(
    "--tasks",
    default="quadratic,logistic,mlp,transformer",
    show_default=True,
    help="comma-separated built-in tasks or user task files/modules, cheapest first (the funnel's "
    "order)",
)
@click.option(
    "--budget",
    default="30m",
    show_default=True,
    help="time (90s, 30m, 2h) or distinct programs (400c)",
)
@click.option(
    "--population",
    type=click.IntRange(min=2),
    default=32,
    show_default=True,
    help="how many of the most recent candidates parents are drawn from",
)
@click.option(
    "--tournament",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="members drawn at random for each parent; the fittest of them is the parent",
)
@click.option(
    "--out",
    default="search-out",
    show_default=True,
    help="folder for the log and results; an existing search there is resumed",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="random seed: the same seed, the same search",
)
@click.option(
    "--winners",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="how many of the best programs to simplify and validate on held-out tasks",
)
@click.option("--quiet", is_flag=True, help="no progress bar")
def search(seed_spec, tasks, budget, population, tournament, out, seed, winners, quiet):
    """Search for optimizer variants by regularized evolution over specs (docs/search.md)."""
    from optgen.cli import print_out
    from optgen.search.budget import parse_budget
    from optgen.search.run import search as run_search
    from optgen.search.tasks import load_task

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise SpecError(
            "--tasks names no task", hint="for example --tasks quadratic,logistic", code="E018"
        )
    parsed_budget = parse_budget(budget)
    for name in names:
        load_task(name)  # every task must load before the search starts
    out_path = Path(out)
    if out_path.exists() and not out_path.is_dir():
        raise SpecError(
            f"--out '{out}' is a file, not a folder", hint="give --out a folder", code="E023"
        )
    run_search(
        seed_spec,
        names,
        parsed_budget,
        out_path,
        population,
        tournament,
        seed,
        progress=not quiet,
        winners=winners,
    )
    print_out((out_path / "summary.md").read_text())
