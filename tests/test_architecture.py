"""The stages import one way (docs/architecture.md): a module imports, at module level, only
modules of its own layer or of a layer below it. Imports inside functions are lazy (for speed or
to break a cycle on purpose) and are not counted; tests/test_runtime.py orders the runtime's
own modules."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parent.parent

# Lowest first. A module's layer is its own entry, else its package's.
LAYERS = [
    ("core", ["types", "diagnostics", "errors", "atomic", "framing", "schedules"]),
    ("op table and IR", ["ops", "ir", "syntax"]),
    ("front end", ["parser", "hazards", "checker", "lower", "library"]),
    ("IR to IR", ["transforms", "passes"]),
    ("compiler", ["compiler", "opt"]),
    ("backends", ["codegen"]),
    ("runtime and products", ["runtime", "artifact", "kernel_report"]),
    ("program search", ["search"]),
    ("entry points", ["cli", "keras", "__init__"]),
]
LAYER = {name: rank for rank, (_, names) in enumerate(LAYERS) for name in names}


def _modules():
    """(name under optgen, path) for every module: optgen/X.py is X, passes/ is
    optgen.passes, ...
    """
    for folder, package in (("optgen", ""), ("passes", "passes."), ("codegen", "codegen.")):
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            yield (
                package + ".".join(parts) if parts != ("__init__",) or package else "__init__",
                path,
            )


def _layer(module: str) -> int:
    """``transforms.clip`` -> the layer of ``transforms``; ``passes.__init__`` -> that of
    ``passes``.
    """
    return LAYER.get(module, LAYER.get(module.split(".")[0]))


def _imports(path: pathlib.Path):
    """The optgen modules a file imports at module level (``from optgen import syntax`` counts as
    ``syntax``; ``from optgen.transforms import TransformOptions`` as ``transforms``)."""
    for node in ast.parse(path.read_text()).body:
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.split(".")[0] == "optgen"
        ):
            inside = node.module.removeprefix("optgen").removeprefix(".")
            if inside:
                yield inside
            else:
                yield from (alias.name for alias in node.names if alias.name != "__version__")


@pytest.mark.parametrize(
    "module, path", list(_modules()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_imports_run_one_way(module, path):
    assert _layer(module) is not None, (
        f"{module} has no layer: add it to LAYERS and docs/architecture.md"
    )
    for imported in _imports(path):
        assert _layer(imported) is not None, f"{module} imports {imported}, which has no layer"
        assert _layer(imported) <= _layer(module), (
            f"{module} ({LAYERS[_layer(module)][0]}) imports {imported} "
            f"({LAYERS[_layer(imported)][0]})"
        )


def test_the_check_sees_a_wrong_import(tmp_path):
    wrong = tmp_path / "wrong.py"
    wrong.write_text("from optgen.runtime.optimizer import Optimizer\nfrom optgen import ir\n")
    assert list(_imports(wrong)) == ["runtime.optimizer", "ir"]
    assert _layer("runtime.optimizer") > _layer("ops") and _layer("ir") == _layer("ops")
