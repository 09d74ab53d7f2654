"""Fail the docs build when a public name of gradguard has no docstring or no API page.

mkdocstrings has no option that fails on a missing docstring, so this check does it. The
public names are those in ``__all__`` of ``gradguard`` and of each integration module; for
every class among them, so is each public method and property it defines (a method that
overrides a documented one of a base class counts as documented: the site shows the
inherited docstring, through the ``griffe_inherited_docstrings`` extension). A constant
(``EVENT_KINDS``) needs the docstring written under it, as griffe reads it for the site: its
``__doc__`` would be its type's. Every name in
``gradguard.__all__`` must also be rendered by a ``::: gradguard.NAME`` line of a page under
``docs/reference/api/``, and each integration module by ``::: gradguard.integrations.X``.

Names that lack a docstring today are listed in ``docs/undocumented.txt``: the check fails
on a missing docstring that is not in that list, and on a listed name that has one now (so
the list only shrinks). Run it alone with ``python docs/check_api.py``; ``mkdocs
build`` runs it through the ``on_pre_build`` hook below (see ``hooks:`` in mkdocs.yml).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import sys
from pathlib import Path
from typing import Any

MODULES = (
    "gradguard",
    "gradguard.integrations.lightning",
    "gradguard.integrations.mlflow",
    "gradguard.integrations.tensorboard",
    "gradguard.integrations.transformers",
    "gradguard.integrations.wandb",
)
BASELINE = Path(__file__).with_name("undocumented.txt")
API_PAGES = Path(__file__).with_name("reference") / "api"


@functools.cache
def _sources() -> Any:
    """gradguard as griffe reads it (with ``gradguard.integrations``), for attribute docstrings."""
    import griffe

    extensions = griffe.load_extensions(
        f"{Path(__file__).with_name('griffe_integrations.py')}:IntegrationsSubpackage"
    )
    return griffe.load("gradguard", extensions=extensions, resolve_aliases=False)


def _data_doc(qualified: str) -> str | None:
    """The docstring written under a module attribute (``NAME = ...`` then a string), as the
    site shows it; a constant has no ``__doc__`` of its own (its type's would be found)."""
    try:
        docstring = _sources()[qualified.removeprefix("gradguard.")].docstring
    except (KeyError, AttributeError):
        return None
    return docstring.value if docstring is not None and docstring.value.strip() else None


def _own_doc(obj: Any, qualified: str = "") -> str | None:
    if not (inspect.isclass(obj) or inspect.ismodule(obj) or callable(obj)):
        return _data_doc(qualified)
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__")
        if dataclasses.is_dataclass(obj) and doc and doc.startswith(f"{obj.__name__}("):
            return None  # the signature dataclasses write when the class has no docstring
        return doc if doc and doc.strip() else None
    return inspect.getdoc(obj) or None


def _member_doc(cls: type, name: str) -> str | None:
    for klass in cls.__mro__:
        if name not in klass.__dict__ or klass is object:
            continue
        member = klass.__dict__[name]
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        doc = getattr(member, "__doc__", None)
        if isinstance(doc, str) and doc.strip():
            return doc
    return None


def _public_members(cls: type) -> list[str]:
    names = []
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, (staticmethod, classmethod, property)) or inspect.isfunction(member):
            names.append(name)
    return names


def undocumented() -> list[str]:
    """Qualified names of public objects (and their public methods) without a docstring."""
    missing: list[str] = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        if not _own_doc(module):
            missing.append(module_name)
        for name in getattr(module, "__all__", ()):
            if name.startswith("__"):
                continue  # __version__
            obj = getattr(module, name)
            qualified = f"{module_name}.{name}"
            if not _own_doc(obj, qualified):
                missing.append(qualified)
            if inspect.isclass(obj):
                missing += [
                    f"{qualified}.{member}"
                    for member in _public_members(obj)
                    if not _member_doc(obj, member)
                ]
    return missing


def baseline() -> list[str]:
    lines = BASELINE.read_text().splitlines() if BASELINE.exists() else []
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def unrendered() -> list[str]:
    """Public names that no API page renders with a ``::: name`` line."""
    rendered = set()
    for page in sorted(API_PAGES.glob("*.md")):
        for line in page.read_text().splitlines():
            if line.startswith("::: "):
                rendered.add(line[4:].strip())
    gradguard = importlib.import_module("gradguard")
    wanted = [f"gradguard.{name}" for name in gradguard.__all__ if not name.startswith("__")]
    wanted += list(MODULES[1:])
    return [name for name in wanted if name not in rendered]


def problems() -> list[str]:
    """What is wrong, one sentence each; empty when the check passes."""
    found = [f"{name} is public but no page under {API_PAGES} renders it" for name in unrendered()]
    missing = undocumented()
    known = baseline()
    found += [
        f"{name} has no docstring (write one, or, for now, list it in {BASELINE.name})"
        for name in missing
        if name not in known
    ]
    found += [
        f"{name} is listed in {BASELINE.name} but has a docstring now (or no longer exists): "
        "remove the line"
        for name in known
        if name not in missing
    ]
    return found


def on_pre_build(config: Any) -> None:
    """mkdocs hook: stop the build on a missing docstring or API page."""
    from mkdocs.exceptions import PluginError

    found = problems()
    if found:
        raise PluginError("API check failed (docs/check_api.py):\n  " + "\n  ".join(found))


def main(argv: list[str]) -> int:
    if "--list" in argv:
        print("\n".join(undocumented()))
        return 0
    found = problems()
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
