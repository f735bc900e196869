"""The error catalog (optgen/errors.py) and docs/errors.md agree with the code that raises.

- every example in docs/errors.md raises (or warns) exactly its section's code;
- every code in the catalog has a section, and every section a catalog entry;
- every place that raises a diagnostic passes ``code=`` with a catalog code, and every
  catalog code is raised somewhere (a new error site fails here until it has a code).
"""

from __future__ import annotations

import ast
import pathlib
import re
import shlex
import warnings

import pytest
from click.testing import CliRunner

import optgen
from optgen.cli import main
from optgen.errors import CATALOG

ROOT = pathlib.Path(__file__).parent.parent
DOC = (ROOT / "docs" / "errors.md").read_text()
SECTIONS = dict(re.findall(r"^## ([EW]\d{3}) .*?\n(.*?)(?=^## |\Z)", DOC, re.S | re.M))
PRELUDE = re.search(r"```python\n(.*?)```", DOC, re.S).group(1)
SOURCE_DIRS = ("optgen", "codegen", "passes")
# and self.error(...), self.warn(...)
RAISERS = {"SpecError", "InputError", "_LocatedError", "decode_source"}


def test_catalog_and_doc_list_the_same_codes():
    assert sorted(SECTIONS) == sorted(CATALOG)
    for code, summary in CATALOG.items():
        assert re.search(rf"^## {code} {re.escape(summary)}$", DOC, re.M), code


@pytest.mark.parametrize("code", sorted(CATALOG))
def test_doc_example_raises_its_code(code, tmp_path, monkeypatch):
    lang, example = re.search(r"```(spec|python|console)\n(.*?)```", SECTIONS[code], re.S).groups()
    monkeypatch.chdir(tmp_path)
    if lang == "spec":
        (tmp_path / "example.spec").write_text(example)
        result = CliRunner().invoke(main, ["check", "example.spec"])
    elif lang == "console":
        result = CliRunner().invoke(main, shlex.split(example.strip().removeprefix("$ optgen ")))
    else:
        if "optgen.keras" in example:
            pytest.importorskip(
                "keras", reason="keras is not installed (pip install -e '.[conformance]')"
            )
        namespace: dict = {}
        exec(PRELUDE, namespace)
        with warnings.catch_warnings():
            warnings.simplefilter("error", optgen.SpecWarning)
            with pytest.raises(optgen.Diagnostic) as err:
                exec(example, namespace)
        assert err.value.code == code, err.value.render()
        return
    if code.startswith("W"):
        assert result.exit_code == 0 and f"warning[{code}]" in result.output, result.output
    else:
        assert result.exit_code == 1 and f"error[{code}]" in result.output, result.output
        assert "Traceback" not in result.output


def _raise_sites():
    """(file:line, code or None) for every call that builds a diagnostic."""
    for folder in SOURCE_DIRS:
        for file in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(file.read_text())):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                name = (
                    func.id
                    if isinstance(func, ast.Name)
                    else func.attr
                    if isinstance(func, ast.Attribute)
                    else None
                )
                checker_error = (
                    name in ("error", "warn")
                    and isinstance(func, ast.Attribute)
                    and isinstance(func.value, ast.Name)
                    and func.value.id == "self"
                )
                if name in RAISERS or checker_error:
                    code = next((k.value for k in node.keywords if k.arg == "code"), None)
                    if code is not None and not isinstance(code, ast.Constant):
                        # forwards a code chosen elsewhere (checker.error, parser's _LocatedError)
                        continue
                    yield f"{file.relative_to(ROOT)}:{node.lineno}", code and code.value


def test_every_raise_site_has_a_catalog_code():
    missing = [site for site, code in _raise_sites() if code not in CATALOG]
    assert missing == [], (
        "give these a code=... from optgen/errors.py (add one there and in docs/errors.md)"
    )


def test_every_catalog_code_is_raised_somewhere():
    used = {code for _, code in _raise_sites()}
    assert sorted(set(CATALOG) - used) == []
