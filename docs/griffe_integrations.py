"""Griffe extension: load ``integrations/`` as the subpackage ``gradguard.integrations``.

The wheel ships the top-level folder ``integrations/`` as ``gradguard.integrations``
(setuptools ``package-dir``). Griffe reads sources from the package's folder and so never
finds it there; this extension visits the folder the import system maps it to (found
without importing it) and hangs it under ``gradguard`` before aliases are resolved.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import griffe

PACKAGE, SUBPACKAGE = "gradguard", "integrations"


class IntegrationsSubpackage(griffe.Extension):
    """Adds ``gradguard.integrations`` and its modules to the loaded ``gradguard`` package."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != PACKAGE or SUBPACKAGE in pkg.members:
            return
        spec = importlib.util.find_spec(f"{PACKAGE}.{SUBPACKAGE}")
        if spec is None or not spec.submodule_search_locations:
            raise griffe.LoadingError(f"{PACKAGE}.{SUBPACKAGE} is not installed")
        folder = Path(next(iter(spec.submodule_search_locations)))
        subpackage = self._visit(SUBPACKAGE, folder / "__init__.py", pkg, loader)
        for path in sorted(folder.glob("*.py")):
            if path.name != "__init__.py":
                self._visit(path.stem, path, subpackage, loader)

    @staticmethod
    def _visit(
        name: str, path: Path, parent: griffe.Module, loader: griffe.GriffeLoader
    ) -> griffe.Module:
        code = path.read_text(encoding="utf-8")
        loader.lines_collection[path] = code.splitlines()
        module = griffe.visit(
            name,
            filepath=path,
            code=code,
            parent=parent,
            extensions=loader.extensions,
            docstring_parser=loader.docstring_parser,
            docstring_options=loader.docstring_options,
            lines_collection=loader.lines_collection,
            modules_collection=loader.modules_collection,
        )
        parent.set_member(name, module)
        return module
