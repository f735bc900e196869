"""Finding specs: built-in names (``adamw``, ``keras/adamw``) or paths to ``.spec`` files."""

from __future__ import annotations

import codecs
import os
from importlib import resources
from pathlib import Path

from optgen.diagnostics import Source, SpecError, decode_source, did_you_mean
from optgen.parser import MAX_SPEC_CHARS


def builtin_names() -> list[str]:
    """Every built-in spec's name, sorted: ``adamw``, and ``keras/adamw`` for files in folders."""
    root = resources.files("optgen.kernels")
    names = []
    stack = [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        for entry in folder.iterdir():
            if entry.is_dir() and not entry.name.startswith("__"):
                stack.append((entry, f"{prefix}{entry.name}/"))
            elif entry.name.endswith(".spec"):
                names.append(prefix + entry.name[: -len(".spec")])
    return sorted(names)


def read_spec(name_or_path: str | os.PathLike) -> Source:
    """The text of a built-in spec, or of a spec file when the argument is a path."""
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str):
        raise SpecError(
            f"a spec is a built-in name or a path, got {type(name_or_path).__name__}",
            hint="for example optgen.load('adamw') or optgen.load('my.spec')",
            code="E001",
        )
    path = Path(name_or_path)
    if name_or_path.endswith(".spec") or _exists(path):
        return _read_file(path)
    if name_or_path in builtin_names():
        resource = resources.files("optgen.kernels").joinpath(f"{name_or_path}.spec")
        return Source(resource.read_text(encoding="utf-8"), f"{name_or_path}.spec")
    raise SpecError(
        f"no built-in spec or file named '{name_or_path}'",
        hint=did_you_mean(name_or_path, builtin_names())
        or "run 'optgen list' for the built-in specs, or give a path to a .spec file",
        code="E001",
    )


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a name too long to be a path: then it is not one
        return False


def _read_file(path: Path) -> Source:
    limit = MAX_SPEC_CHARS * 4  # UTF-8: at most 4 bytes a character
    try:
        if path.is_dir():
            raise SpecError(
                f"'{path}' is a directory", hint="give the path of a .spec file", code="E002"
            )
        # read at most one byte past the limit: pipes and devices have no size
        with open(path, "rb") as file:
            data = file.read(limit + 1)
    except FileNotFoundError:
        raise SpecError(
            f"cannot read '{path}': no such file",
            hint="check the path, or run 'optgen list' for the built-in specs",
            code="E003",
        ) from None
    except OSError as err:
        raise SpecError(f"cannot read '{path}': {err.strerror}", code="E004") from None
    if len(data) > limit:
        raise SpecError(
            f"'{path}' is more than {limit:,} bytes; a spec is at most {MAX_SPEC_CHARS:,} "
            "characters",
            hint="is this the right file?",
            code="E008",
        )
    data = data.removeprefix(codecs.BOM_UTF8)  # editors on Windows start UTF-8 files with one
    return decode_source(data, str(path), hint="save the spec as UTF-8", code="E005")
