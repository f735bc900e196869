"""The README's examples run: every ```python block of the sections named here, in order,
in one namespace (the later blocks build on the earlier ones)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = (Path(__file__).parent.parent / "README.md").read_text()

# section title: modules its examples need (the test skips, saying which, where one is missing)
SECTIONS = {
    "Using optgen with flax, equinox, orbax and jax transforms": (
        "flax.nnx",
        "equinox",
        "orbax.checkpoint",
    )
}


def python_blocks(title: str) -> list[str]:
    section = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert section, f"README has no section '{title}'"
    return re.findall(r"```python\n(.*?)```", section.group(1), re.S)


@pytest.mark.parametrize("title", SECTIONS)
def test_readme_section_runs(title):
    for module in SECTIONS[title]:
        pytest.importorskip(module)
    blocks = python_blocks(title)
    assert blocks
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, f"README.md: {title}", "exec"), namespace)
