"""Configuration, resolved once at the edge: where flows come from and what `call:` may call.

`FlowSource` is the one place that knows the flows folder (`PLANNER_FLOWS`, default `./flows`)
and the `.yaml` / `.yml` lookup. `CallTargets` is one Planner's allow-list: the packages named
by `PLANNER_ALLOWED_MODULES` or the caller, else the demo's flow functions and the Python
modules next to the flows. Modules of a flows folder are imported under a private package of
that folder (never by putting the folder on `sys.path`), so two Planners with different
folders, each holding a `helpers.py`, get their own functions, and nothing a folder holds can
shadow an installed module. Folder modules import each other relatively (`from . import util`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.errors import FlowFileError, FlowInputError

# Only what is meant to be called from a flow: the escalation rules. Never the demo's data
# loaders (they truncate tables of a DSN given to them) or anything else that takes a DSN.
DEFAULT_ALLOWED = ("planner.demo.escalation",)
SUFFIXES = (".yaml", ".yml")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TARGET = re.compile(r"(?P<module>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*):(?P<attr>[A-Za-z_][A-Za-z0-9_]*)")
_LOCAL_ROOT = "planner._local"


@dataclass(frozen=True)
class FlowSource:
    """A folder of flow files, `<folder>/<name>.yaml` (or `.yml`)."""

    folder: Path

    @classmethod
    def resolve(cls, folder: str | os.PathLike[str] | None = None) -> FlowSource:
        """`folder`, else `PLANNER_FLOWS`, else `./flows`."""
        return cls(Path(folder if folder is not None else os.environ.get("PLANNER_FLOWS", "flows")))

    def path_of(self, name: str) -> Path:
        """The file of flow `name`. Raises `FlowInputError` (not a name) or `FlowFileError` (none)."""
        if not _NAME.fullmatch(name):
            raise FlowInputError(f"{name!r} is not a flow name")
        for suffix in SUFFIXES:
            path = self.folder / f"{name}{suffix}"
            if path.exists():
                return path
        raise FlowFileError(f"no flow named {name!r} in {self.folder}/", file=self.folder / f"{name}.yaml")

    def paths(self) -> list[Path]:
        """Every flow file of the folder, sorted."""
        return sorted(p for suffix in SUFFIXES for p in self.folder.glob(f"*{suffix}"))


def module_allowed(module: str, allowed: Iterable[str]) -> bool:
    """`myflows` allows `myflows` and `myflows.tasks`, never `myflows_evil`."""
    return any(module == a or module.startswith(a + ".") for a in allowed if a)


class CallTargets:
    """One Planner's allow-list for `call:` targets, and the importer of its folder's modules.

    >>> targets = CallTargets(folder=Path("flows"))
    >>> targets.resolve("planner.demo.escalation:needs_escalation")  # doctest: +ELLIPSIS
    <function needs_escalation at ...>
    """

    def __init__(self, allowed: Iterable[str] | None = None, *, folder: Path | None = None) -> None:
        self.folder = folder.resolve() if folder is not None else None
        self.local = _modules_in(self.folder) if self.folder is not None else []
        if allowed is not None:
            self.allowed = list(allowed)
        elif (configured := os.environ.get("PLANNER_ALLOWED_MODULES")) is not None:
            self.allowed = [m.strip() for m in configured.split(",") if m.strip()]
        else:
            self.allowed = [*DEFAULT_ALLOWED, *self.local]
        self._package: str | None = None

    def resolve(self, target: str) -> Callable[..., Any]:
        """The function named by `target`. Raises `ValueError` saying why not."""
        match = _TARGET.fullmatch(target)
        if not match:
            raise ValueError(f"call target {target!r} must look like 'package.module:function'")
        module_name, attr = match.group("module"), match.group("attr")
        if not module_allowed(module_name, self.allowed):
            raise ValueError(
                f"module {module_name!r} is not allowed (allowed: {', '.join(self.allowed) or 'none'}; "
                "set PLANNER_ALLOWED_MODULES to widen)"
            )
        module = self._import(module_name)
        fn = getattr(module, attr, None)
        if fn is None:
            raise ValueError(f"module {module_name!r} has no function {attr!r}")
        if not inspect.isfunction(fn) or fn.__module__ != module.__name__:
            raise ValueError(f"{target!r} is not a function defined in {module_name!r}")
        return fn

    def _import(self, module_name: str) -> types.ModuleType:
        top = module_name.split(".")[0]
        try:
            if top in self.local:
                return importlib.import_module(f"{self._local_package()}.{module_name}")
            return importlib.import_module(module_name)
        except Exception as exc:  # an import runs the module's code: any error is the module's
            raise ValueError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from exc

    def _local_package(self) -> str:
        """A package of its own for this folder: `planner._local.f<hash of the folder>`."""
        if self._package is None:
            assert self.folder is not None
            root = sys.modules.get(_LOCAL_ROOT)
            if root is None:
                root = types.ModuleType(_LOCAL_ROOT, "planner's private home of flows-folder modules")
                root.__path__ = []
                sys.modules[_LOCAL_ROOT] = root
            name = f"{_LOCAL_ROOT}.f{hashlib.sha256(str(self.folder).encode()).hexdigest()[:16]}"
            if name not in sys.modules:
                package = types.ModuleType(name)
                package.__path__ = [str(self.folder)]
                sys.modules[name] = package
            self._package = name
        return self._package


def _modules_in(folder: Path) -> list[str]:
    """Python modules (files and packages) in `folder` whose real file is inside it: a symlink
    to a file elsewhere (`helpers.py -> /usr/lib/python3/subprocess.py`) is not a module of
    the folder. Names of standard-library modules are skipped so that `os:popen` can never
    mean a folder's file."""
    if not folder.is_dir():
        return []
    found: list[str] = []
    for path in [*folder.glob("*.py"), *folder.glob("*/__init__.py")]:
        name = path.stem if path.name != "__init__.py" else path.parent.name
        real = path.resolve()
        if not _NAME.fullmatch(name) or not real.is_relative_to(folder) or name in sys.stdlib_module_names:
            continue
        if path.name == "__init__.py" and path.parent.resolve() != folder / name:
            continue  # a symlinked package directory
        found.append(name)
    return sorted(set(found))
