"""The docs' examples run: every ```python block of the sections named here, in order, in one
namespace per section (the later blocks build on the earlier ones)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent

# (page, section title): modules its examples need (the test skips, saying which, where one is
# missing). docs/frameworks.md's Keras examples run in tests/test_keras_optimizer.py.
SECTIONS = {
    ("README.md", "Quick start"): (),
    ("README.md", "Using optgen with flax, equinox, orbax and jax transforms"): ("flax.nnx",),
    ("docs/jax.md", "Examples"): ("flax.nnx", "equinox", "orbax.checkpoint"),
}


def python_blocks(page: str, title: str) -> list[str]:
    text = (ROOT / page).read_text()
    section = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert section, f"{page} has no section '{title}'"
    return re.findall(r"```python\n(.*?)```", section.group(1), re.S)


@pytest.mark.parametrize("page,title", SECTIONS)
def test_docs_section_runs(page, title):
    for module in SECTIONS[page, title]:
        pytest.importorskip(module)
    blocks = python_blocks(page, title)
    assert blocks
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, f"{page}: {title}", "exec"), namespace)
