"""docs/specs.md's gallery lists every built-in spec with its true line count; `optgen list` cites
papers.
"""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import optgen

ROOT = Path(__file__).resolve().parent.parent
GALLERY = runpy.run_path(str(ROOT / "tools" / "gallery.py"))


def _readme_rows() -> dict[str, int]:
    text = (ROOT / "docs" / "specs.md").read_text()
    section = text[text.index("## Gallery") : text.index("## Adding an optimizer")]
    return {
        name: int(lines) for name, lines in re.findall(r"^\| `([\w/]+)` \| (\d+) \|", section, re.M)
    }


def test_gallery_lists_every_spec_with_its_line_count():
    rows = _readme_rows()
    assert set(rows) == set(optgen.builtin_names())
    for name, lines in rows.items():
        assert lines == GALLERY["spec_lines"](name), name


def test_gallery_counts_the_optax_source_it_replaces():
    names, funcs = GALLERY["reference"]("adamw")
    assert names == "optax.adamw"
    assert [f.__name__ for f in funcs] == [
        "adamw",
        "scale_by_adam",
        "add_decayed_weights",
        "scale_by_learning_rate",
    ]
    # its own 12 code lines; the docstring is left out
    assert GALLERY["source_lines"](GALLERY["source_lines"]) == 12


def test_every_builtin_spec_cites_its_paper():
    for name in optgen.builtin_names():
        description = optgen.check_spec(name).spec.description
        assert re.search(r"\((?:[^()]*\b(?:19|20)\d\d\b[^()]*)\)", description), (name, description)
