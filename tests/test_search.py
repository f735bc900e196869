"""optgen mutate and optgen search: the spec printer, mutations, deduplication, tasks, scoring
against optax, the log and resume, the 8-device spread, and each error code.

Cheap by design: searches here run on the quadratic task (a compile of about half a second per
candidate) for a handful of candidates.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import optgen
from optgen.checker import check
from optgen.cli import main
from optgen.diagnostics import SpecError
from optgen.library import read_spec
from optgen.parser import parse
from optgen.search import log as search_log
from optgen.search.budget import Budget, parse_budget
from optgen.search.evaluate import best_loss, launch, log_ratio, prepare
from optgen.search.evolve import Evolution
from optgen.search.mutate import mutate, parse_text
from optgen.search.program import program_of
from optgen.search.report import validation_table
from optgen.search.run import settings_for
from optgen.search.simplify import TOLERANCE, simplify
from optgen.search.tasks import load_task
from optgen.search.validate import Result
from optgen.syntax import format_source, format_spec

ROOT = pathlib.Path(__file__).parent.parent
EXAMPLES = int(os.environ.get("OPTGEN_FUZZ_EXAMPLES", 40))
ADAMW = read_spec("adamw").text


@pytest.fixture(scope="module")
def quadratic():
    return prepare(load_task("quadratic"))


# ---- the printer --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", optgen.builtin_names())
def test_printed_spec_parses_to_the_same_tree(name):
    source = read_spec(name)
    tree = parse(source.text, source.filename)
    printed = format_source(tree)
    assert format_spec(parse(printed, "printed.spec")) == format_spec(tree)
    assert format_source(parse(printed, "printed.spec")) == printed


def test_printer_keeps_only_needed_parentheses():
    tree = parse(
        "optimizer x\nhyper a = 1\nupdate:\n  p = -(p^2)^a - (g - a) * -g / (a * g) + 2^-a\n",
        "x.spec",
    )
    assert format_source(tree).splitlines()[-1] == "  p = -(p^2)^a - (g - a) * -g / (a * g) + 2^-a"


# ---- mutations ----------------------------------------------------------------------------------


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    name=st.sampled_from(["adamw", "lion", "sgd", "adafactor", "muon", "nadam"]),
    seed=st.integers(0, 2**32 - 1),
    edits=st.integers(1, 3),
)
def test_every_mutant_checks_compiles_and_prints_stably(name, seed, edits):
    mutant = mutate(parse_text(read_spec(name).text), random.Random(seed), edits)
    check(parse(mutant.text, "mutant.spec"))
    program_of(mutant.text)  # lowers and runs the pass pipeline
    assert format_source(parse(mutant.text, "mutant.spec")) == mutant.text
    assert len(mutant.edits) == edits


def test_mutate_command_is_reproducible_and_prints_valid_specs(tmp_path):
    runner = CliRunner()
    first = runner.invoke(main, ["mutate", "adamw", "--seed", "7", "-n", "4", "--edits", "2"])
    again = runner.invoke(main, ["mutate", "adamw", "--seed", "7", "-n", "4", "--edits", "2"])
    other = runner.invoke(main, ["mutate", "adamw", "--seed", "8", "-n", "4", "--edits", "2"])
    assert first.exit_code == 0, first.output
    assert first.output == again.output != other.output
    variants = first.output.split("\n# variant ")
    assert len(variants) == 4
    for k, text in enumerate(variants):
        path = tmp_path / f"v{k}.spec"
        path.write_text("# " + text if k else text)
        result = runner.invoke(main, ["check", str(path)])
        # warnings allowed
        assert result.exit_code == 0 and result.output.endswith(f"{path}: ok\n"), result.output


def test_mutate_gives_up_with_a_diagnostic():
    with pytest.raises(SpecError) as err:
        mutate(parse_text(ADAMW), random.Random(0), tries=0)
    assert err.value.code == "E019"


# ---- deduplication ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "before, after",
    [
        ("mu = b1 * mu + (1 - b1) * g", "mu = b1 * mu + (1 - b1) * g * 1"),
        ("mu = b1 * mu + (1 - b1) * g", "mu = (b1 * mu) + ((2 - 1 - b1) * (g + 0))"),
        ("mu = b1 * mu + (1 - b1) * g", "mu = b1 * mu + (1 - b1) * --g^1"),
        ("update:", "update:\n  unused = sqrt(g) * nu"),  # dead code
    ],
)
def test_programs_equal_after_the_passes_are_one_program(before, after):
    assert program_of(ADAMW.replace(before, after)).digest == program_of(ADAMW).digest


def test_different_programs_and_defaults_are_different_programs():
    digests = {
        program_of(ADAMW).digest,
        program_of(ADAMW.replace("b2 = 0.999", "b2 = 0.99")).digest,
        program_of(ADAMW.replace("(1 - b1) * g", "(1 - b1) * sign(g)")).digest,
    }
    assert len(digests) == 3
    # The learning rate is tuned by the search, so its default does not make a new program.
    assert (
        program_of(ADAMW.replace("learning_rate = 1e-3", "learning_rate = 1")).digest
        == program_of(ADAMW).digest
    )


# ---- tasks and scoring --------------------------------------------------------------------------

USER_TASK = """
import jax, jax.numpy as jnp, numpy as np

steps = 30

def init(key):
    return {"w": jax.random.normal(key, (5,)), "b": jnp.zeros(())}

def loss(params, batch):
    x, y = batch
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

def batches(seed):
    rng = np.random.default_rng(seed)
    while True:
        x = rng.normal(size=(16, 5)).astype(np.float32)
        yield x, (x @ np.arange(5.0) + 1).astype(np.float32)

def held_out():
    x = np.random.default_rng(99).normal(size=(64, 5)).astype(np.float32)
    return x, (x @ np.arange(5.0) + 1).astype(np.float32)
"""


def test_a_user_task_scores_as_an_optax_training_loop(tmp_path):
    """The vmapped grid (learning rates in the state, seeds drawing the parameters) against one
    plain optax.adamw loop per pair: the same held-out losses."""
    (tmp_path / "regression.py").write_text(USER_TASK)
    task = load_task(str(tmp_path / "regression.py"))
    assert task.steps == 30
    prepared = prepare(task)
    lrs, seeds = (1e-2, 1e-1), (0, 3)
    got = np.asarray(launch(optgen.load("adamw"), prepared, lrs, seeds))

    @jax.jit
    def optax_run(lr, seed):
        opt = optax.adamw(lr, weight_decay=1e-4)

        def step(carry, batch):
            params, state = carry
            updates, state = opt.update(jax.grad(task.loss)(params, batch), state, params)
            return (optax.apply_updates(params, updates), state), None

        params = task.init(jax.random.key(seed))
        (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), prepared.batches)
        return task.loss(params, prepared.held_out)

    for i, lr in enumerate(lrs):
        for j, seed in enumerate(seeds):
            np.testing.assert_allclose(got[i, j], optax_run(lr, seed), rtol=2e-4)
    assert got[1].mean() < got[0].mean()  # a test that can fail: the larger rate trains further


def test_a_task_module_by_import_name(tmp_path, monkeypatch):
    (tmp_path / "my_search_task.py").write_text(USER_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_task("my_search_task").steps == 30


@pytest.mark.parametrize("name", ["quadratic", "logistic", "mlp", "transformer"])
def test_builtin_tasks_train_with_adamw(name):
    task = load_task(name)
    prepared = prepare(task)
    start = float(task.loss(task.init(jax.random.key(0)), prepared.held_out))
    loss, _ = best_loss(launch(optgen.load("adamw"), prepared, (1e-3, 1e-2), (0,)))
    assert loss < 0.8 * start
    variant = load_task(name, variant=1)  # a held-out task: another problem of the same kind
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda x: x + rng.normal(size=x.shape).astype(np.float32), task.init(jax.random.key(0))
    )
    assert float(variant.loss(params, variant.held_out())) != float(
        task.loss(params, task.held_out())
    )


def test_best_loss_and_ratio_treat_divergence_as_worst():
    losses = np.array([[1.0, np.nan], [2.0, 2.2], [0.5, 3.5]])
    assert best_loss(losses) == (2.0, 2)
    assert best_loss(np.full((2, 2), np.inf))[0] == np.inf
    assert log_ratio(np.inf, 1.0) == 2.0 and log_ratio(1e-9, 1.0) == -2.0
    assert log_ratio(np.e**0.5, 1.0) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "source, code",
    [
        (
            "def init(key): return {}\ndef batches(seed): return iter(())\ndef held_out(): "
            "return 0\n",
            "E395",
        ),
        ("raise ValueError('no data here')\n", "E396"),
        (USER_TASK.replace("steps = 30", "steps = 0"), "E397"),
        (USER_TASK.replace("    while True:", "    for _ in range(3):"), "E398"),
    ],
)
def test_a_broken_user_task_is_a_diagnostic(tmp_path, source, code):
    (tmp_path / "broken.py").write_text(source)
    with pytest.raises(SpecError) as err:
        prepare(load_task(str(tmp_path / "broken.py")))
    assert err.value.code == code, err.value.render()


# ---- budget, log and resume ---------------------------------------------------------------------


def test_budget_strings():
    assert parse_budget("30m") == Budget(seconds=1800.0)
    assert parse_budget(" 90s") == Budget(seconds=90.0) and parse_budget("1.5h") == Budget(
        seconds=5400.0
    )
    assert parse_budget("400c") == Budget(candidates=400)
    for bad in ("30", "30min", "-5m", "0m", "1.5c", "m"):
        with pytest.raises(SpecError) as err:
            parse_budget(bad)
        assert err.value.code == "E020"


def test_a_log_cut_short_by_a_kill_is_read_up_to_its_last_whole_line(tmp_path):
    path = tmp_path / "log.jsonl"
    search_log.start(path, {"seed": 1})
    search_log.append(path, {"index": 0})
    with open(path, "a") as file:
        file.write('{"index": 1, "tex')
    assert search_log.read(path) == ({"seed": 1}, [{"index": 0}])
    search_log.start(path, {"seed": 1}, kept=1)  # resuming cuts the torn line
    assert path.read_text().count("\n") == 2
    (tmp_path / "other.jsonl").write_text('{"index": 0}\n')
    with pytest.raises(SpecError) as err:
        search_log.read(tmp_path / "other.jsonl")
    assert err.value.code == "E021"


def _records(folder):
    return [
        {k: v for k, v in r.items() if k != "elapsed"}
        for r in search_log.read(folder / "log.jsonl")[1]
    ]


def test_a_resumed_search_ends_as_an_uninterrupted_one(tmp_path, quadratic):
    config = settings_for("adamw", ["quadratic"], population=4, tournament=2, seed=3)
    whole = Evolution(config, [quadratic], tmp_path / "whole")
    for _ in range(6):
        whole.round(0.0, 0.0)
    killed = Evolution(config, [quadratic], tmp_path / "killed")
    for _ in range(3):
        killed.round(0.0, 0.0)
    with open(tmp_path / "killed" / "log.jsonl", "a") as file:
        file.write('{"index": 4, "par')  # killed while writing the next candidate
    resumed = Evolution(config, [quadratic], tmp_path / "killed")
    assert resumed.evaluated == 3
    for _ in range(3):
        resumed.round(0.0, 0.0)
    assert _records(tmp_path / "whole") == _records(tmp_path / "killed")
    # the seed and 6 distinct children
    assert len({r["digest"] for r in _records(tmp_path / "whole")}) == 7
    with pytest.raises(SpecError) as err:
        Evolution({**config, "seed": 4}, [quadratic], tmp_path / "whole")
    assert err.value.code == "E021" and "(seed)" in err.value.message


def test_the_funnel_ranks_against_every_candidate_that_reached_a_task(tmp_path, quadratic):
    (tmp_path / "regression.py").write_text(USER_TASK)
    second = str(tmp_path / "regression.py")
    evolution = Evolution(
        settings_for("adamw", ["quadratic", second], 4, 2, 0),
        [quadratic, prepare(load_task(second))],
        tmp_path / "out",
    )
    for _ in range(4):
        evolution.round(0.0, 0.0)
    scored = [len(c.stage_scores) for c in evolution.candidates]
    # the seed and 4 children reached task 1
    assert len(evolution.history[1]) == 5 and set(scored) <= {
        1,
        2,
    }
    assert evolution.history[1] == [c.stage_scores[0] for c in evolution.candidates]


def test_simplify_drops_what_does_not_matter_and_keeps_what_does(tmp_path, quadratic):
    evolution = Evolution(settings_for("adamw", ["quadratic"], 4, 2, 0), [quadratic], tmp_path)
    padded = ADAMW.replace("update:", "update:\n  unused = g * 3").replace(
        "  mu_hat =", "  mu = mu * (1 + 1e-12)\n  mu_hat ="
    )
    _, _, fitness = evolution.score_everywhere(padded)
    text, simplified, _ = simplify(evolution, padded, fitness)
    assert "unused" not in text and "1e-12" not in text
    assert simplified <= fitness + TOLERANCE
    body = parse_text(text).body
    assert any(s.target.id == "p" for s in body) and len(body) <= 5


def test_validation_says_when_nothing_beat_the_baseline():
    base = {"a": Result(1.0, 0.1, 1e-3), "b": Result(2.0, 0.1, 1e-3)}
    table, better = validation_table(
        {
            "adamw": base,
            "w1": {"a": Result(0.5, 0.1, 1e-2), "b": Result(2.0, 0.1, 1e-3)},
            "w2": {"a": Result(0.5, 0.1, 1e-2), "b": Result(3.0, 0.1, 1e-3)},
            "w3": {"a": Result(0.95, 0.1, 1e-2), "b": Result(1.95, 0.1, 1e-3)},
        },
        "adamw",
    )
    assert better == ["w1"]
    assert "0.5 ± 0.1 @ 0.01 (better)" in table and "3 ± 0.1 @ 0.001 (worse)" in table


# ---- the command --------------------------------------------------------------------------------


def test_search_command_writes_ranked_specs_log_and_summary(tmp_path):
    out = tmp_path / "out"
    args = [
        "search",
        "--tasks",
        "quadratic",
        "--budget",
        "4c",
        "--population",
        "4",
        "--tournament",
        "2",
        "--out",
        str(out),
        "--winners",
        "1",
        "--quiet",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "Held-out loss" in result.output and "| adamw |" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["candidates"] == 4 and set(summary["held_out"]) == {"adamw", "winner1"}
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 5 and rows[0].startswith("rank,index,parent,digest,fitness")
    for spec in [*sorted((out / "ranked").glob("*.spec")), out / "winners" / "winner1.spec"]:
        assert CliRunner().invoke(main, ["check", str(spec)]).exit_code == 0
    assert (out / "progress.png").exists() == summary["plot"]
    assert not list(out.rglob("*.tmp*"))  # atomic writes leave no temporary files behind
    again = CliRunner().invoke(main, args)  # a finished search resumes to the same result
    assert (
        again.exit_code == 0
        and json.loads((out / "summary.json").read_text())["held_out"] == summary["held_out"]
    )


@pytest.mark.parametrize(
    "args, code",
    [
        (["--tasks", "quadratic,nosuch"], "E018"),
        (["--tasks", " , "], "E018"),
        (["--budget", "30"], "E020"),
        (["--seed-spec", "torch/adamw", "--tasks", "quadratic"], "E022"),
    ],
)
def test_search_command_errors(args, code, tmp_path):
    result = CliRunner().invoke(main, ["search", *args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and f"error[{code}]" in result.output, result.output


def test_search_output_that_is_a_file_or_a_diverging_seed(tmp_path):
    (tmp_path / "file").write_text("")
    result = CliRunner().invoke(
        main, ["search", "--tasks", "quadratic", "--out", str(tmp_path / "file")]
    )
    assert result.exit_code == 1 and "error[E023]" in result.output
    (tmp_path / "wild.spec").write_text(
        ADAMW.replace("p = p - learning_rate *", "p = p + 1e30 * learning_rate *")
    )
    result = CliRunner().invoke(
        main,
        [
            "search",
            "--seed-spec",
            str(tmp_path / "wild.spec"),
            "--tasks",
            "quadratic",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ],
    )
    assert result.exit_code == 1 and "error[E399]" in result.output, result.output


def test_population_spreads_over_eight_devices():
    script = ROOT / "tests" / "scripts" / "search_devices.py"
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and "ok" in result.stderr, result.stderr[-3000:]


def test_the_documented_task_example_trains(tmp_path):
    doc = (ROOT / "docs" / "search.md").read_text()
    example = doc.split("### Your own task", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "doc_task.py").write_text(example)
    task = load_task(str(tmp_path / "doc_task.py"))
    prepared = prepare(task)
    start = float(task.loss(task.init(jax.random.key(0)), prepared.held_out))
    loss, _ = best_loss(launch(optgen.load("adamw"), prepared, (1e-2, 3e-2), (0,)))
    assert task.steps == 100 and loss < 0.5 * start
