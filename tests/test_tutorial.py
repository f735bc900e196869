"""docs/tutorial.md runs as written: its spec is saved, then its Python blocks execute in order."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import optgen

TUTORIAL = Path(__file__).resolve().parent.parent / "docs" / "tutorial.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", TUTORIAL.read_text(), re.M | re.S)


def test_tutorial_runs(tmp_path, monkeypatch):
    (spec,) = _blocks("spec")
    (tmp_path / "lion_rms.spec").write_text(spec)
    (muon,) = _blocks("spec muon_sgd.spec")  # the worked example of matrices and loops
    (tmp_path / "muon_sgd.spec").write_text(muon)
    # global sums, read-only state, outputs, inputs, per-axis statistics
    (tour,) = _blocks("spec tour.spec")
    (tmp_path / "tour.spec").write_text(tour)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for block in _blocks("python"):
        exec(compile(block, str(TUTORIAL), "exec"), scope)


def test_tutorial_error_is_what_the_checker_says(tmp_path):
    (spec,) = _blocks("spec")
    wrong = tmp_path / "lion_rms.spec"
    wrong.write_text(spec.replace("max(rms(p), min_scale)", "max(rms(p), min_scal)"))
    with pytest.raises(optgen.SpecError) as err:
        optgen.check_spec(str(wrong))
    shown = re.search(r"^```\n(lion_rms\.spec:.*?)^```$", TUTORIAL.read_text(), re.M | re.S).group(
        1
    )
    assert err.value.render().replace(str(wrong), "lion_rms.spec").strip() == shown.strip()
