"""The gallery of docs/specs.md: each built-in spec's length beside the source it replaces.

    python tools/gallery.py        # prints the markdown table that docs/specs.md holds

A spec's lines are its non-blank, non-comment lines. A reference's lines are the
non-blank, non-comment, non-docstring source lines (``inspect.getsource``) of the
optax function and of every optax transform it chains (``transform.scale_by_adam``,
``transform.trace``, ...), or for an ``optax.contrib`` alias of the ``scale_by_*`` transform
of its own module it chains; optax's shared tree utilities are not counted. For the
convention specs it is the framework's single-tensor step (torch's ``_single_tensor_*``,
Keras's ``update_step``), and TF Model Garden's ``AdamWeightDecay`` class.
tests/test_gallery.py checks that the table in docs/specs.md is this script's output.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import re
import sys
import textwrap

import optgen
from optgen.library import read_spec

# optax modules whose functions an alias chains, by the names aliases import them as.
_CHAINED = {
    "transform": "optax._src.transform",
    "factorized": "optax._src.factorized",
    "_clipping": "optax.transforms._clipping",
}


def spec_lines(name: str) -> int:
    """Non-blank, non-comment lines of a built-in spec."""
    return sum(
        1
        for line in read_spec(name).text.splitlines()
        if line.strip() and not line.strip().startswith("#")
    )


def source_lines(func) -> int:
    """Non-blank, non-comment source lines of ``func``, without its docstring."""
    source = textwrap.dedent(inspect.getsource(func))
    node = ast.parse(source).body[0]
    skip = set()
    if ast.get_docstring(node) is not None:
        doc = node.body[0]
        skip = set(range(doc.lineno, doc.end_lineno + 1))
    return sum(
        1
        for number, line in enumerate(source.splitlines(), 1)
        if number not in skip and line.strip() and not line.strip().startswith("#")
    )


# Convention specs: the framework class, and the module and functions of its single-tensor step.
_FRAMEWORK = {
    "torch/muon": (
        "torch.optim.Muon",
        "torch.optim._muon",
        "_single_tensor_muon _zeropower_via_newtonschulz _adjust_lr",
    ),
    "torch/adamw": ("torch.optim.AdamW", "torch.optim.adam", "_single_tensor_adam"),
    "torch/adamax": ("torch.optim.Adamax", "torch.optim.adamax", "_single_tensor_adamax"),
    "torch/nadamw": ("torch.optim.NAdam", "torch.optim.nadam", "_single_tensor_nadam"),
    "keras/adamw": ("keras.optimizers.AdamW", "keras.src.optimizers.adam", "Adam.update_step"),
    "keras/adamax": (
        "keras.optimizers.Adamax",
        "keras.src.optimizers.adamax",
        "Adamax.update_step",
    ),
    # the whole class: its clip, decay rule and decay step (the Adam step is a TF kernel)
    "tfm/adamweightdecay": (
        "official.modeling.optimization.legacy_adamw.AdamWeightDecay",
        "official/modeling/optimization/legacy_adamw.py",
        "AdamWeightDecay",
    ),
}


# Specs no library ships: the rule they transcribe (tests/test_conformance.py's NumPy reference).
_PAPER = {
    "cautious_adamw": "Liang et al. (2024), Algorithm 1",
    "shampoo": "Gupta et al. (2018), Algorithm 1",
    "adamw8bit": "Dettmers et al. (2022), block-wise 8-bit state",
    "lion8bit": "Dettmers et al. (2022), block-wise 8-bit state",
}


def reference(name: str) -> tuple[str, list]:
    """The reference's name and the functions that make it up."""
    if name in _PAPER:
        return _PAPER[name], []
    if name in _FRAMEWORK:
        os.environ.setdefault("KERAS_BACKEND", "jax")  # keras reads it at import
        ref, module, paths = _FRAMEWORK[name]
        funcs = []
        for path in paths.split():
            func = (
                _module_file(module) if module.endswith(".py") else importlib.import_module(module)
            )
            for attr in path.split("."):
                func = getattr(func, attr)
            funcs.append(func)
        return ref, funcs
    import optax

    where = "optax" if hasattr(optax, name) else "optax.contrib"
    alias = getattr(optax, name, None) or getattr(optax.contrib, name)
    alias = getattr(alias, "func", alias)  # optax.nadam is a partial of optax.adam
    own = importlib.import_module(alias.__module__)
    local = (
        re.findall(r"(?<![.\w])(scale_by_\w+)\(", inspect.getsource(alias))
        if where == "optax.contrib"
        else []
    )
    chained = [getattr(own, attr) for attr in dict.fromkeys(local)]
    for module, attr in re.findall(
        r"\b(transform|factorized|_clipping)\.(\w+)\(", inspect.getsource(alias)
    ):
        func = getattr(importlib.import_module(_CHAINED[module]), attr)
        if func not in chained:
            chained.append(func)
    return f"{where}.{name}", [alias, *chained]


def _module_file(path: str):
    """A module by its file (TF Model Garden's package __init__ imports gin, which legacy_adamw does
    not need).
    """
    location = os.path.join(
        importlib.util.find_spec(path.split("/")[0]).submodule_search_locations[0],
        *path.split("/")[1:],
    )
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], location)
    # inspect finds its source there
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows() -> list[tuple[str, int, str, int]]:
    """(spec, spec lines, reference, reference lines) for every built-in spec."""
    out = []
    for name in optgen.builtin_names():
        ref, funcs = reference(name)
        out.append((name, spec_lines(name), ref, sum(map(source_lines, funcs))))
    return out


def table() -> str:
    lines = ["| spec | lines | replaces | lines |", "|---|---:|---|---:|"]
    lines += [
        f"| `{name}` | {n} | {f'`{ref}`' if m else ref} | {m or '—'} |"
        for name, n, ref, m in rows()
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(), end="")
