"""Configuration, resolved at the edge (`planner.settings`) and given here: where flows come
from and what `call:` may call.

`FlowSource` is the one place that knows a flows folder and the `.yaml` / `.yml` lookup.
`CallTargets` is one Planner's allow-list: the packages it is given (a Planner gives the
caller's, else the settings' `PLANNER_ALLOWED_MODULES`), else the demo's flow functions and the Python
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
import re
import sys
import threading
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.errors import FlowFileError, FlowInputError
from planner.results import error_text

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

    def path_of(self, name: str) -> Path:
        """The file of flow `name`. Raises `FlowInputError` (not a name) or `FlowFileError` (none)."""
        if not _NAME.fullmatch(name):
            raise FlowInputError(f"{name!r} is not a flow name")
        for suffix in SUFFIXES:
            path = self.folder / f"{name}{suffix}"
            if path.exists():
                return path
        known = [p.stem for p in self.paths()]
        raise FlowFileError(f"no flow named {name!r} in {self.folder}/{did_you_mean(name, known)}",
                            file=self.folder / f"{name}.yaml")

    def paths(self) -> list[Path]:
        """Every flow file of the folder, sorted."""
        return sorted(p for suffix in SUFFIXES for p in self.folder.glob(f"*{suffix}"))


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the known name closest to `name`, or "" when none is close."""
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


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
                return self._import_local(module_name)
            return importlib.import_module(module_name)
        except _NotInFolder as exc:
            raise ValueError(str(exc)) from None
        except Exception as exc:  # an import runs the module's code: any error is the module's
            raise ValueError(f"cannot import {module_name!r}: {error_text(exc)}") from exc

    def _import_local(self, module_name: str) -> types.ModuleType:
        """A module of the folder, each level loaded from the very file checked a moment before.

        Never through the import system's own search of the folder, which would take a package
        directory before a module file, a compiled extension before a source file, and a
        symlink as readily as a file: each level must be a real file of the folder, checked
        when it is loaded (not only when the Planner was made).
        """
        assert self.folder is not None
        package = self._local_package()
        parts = module_name.split(".")
        module: types.ModuleType | None = None
        with _LOADING:
            for depth in range(1, len(parts) + 1):
                dotted = ".".join(parts[:depth])
                origin = _module_file(self.folder, parts[:depth])
                if origin is None:
                    raise _NotInFolder(f"module {dotted!r} is not a module of the flows folder {self.folder}/ "
                                       "(its file must be a .py file inside it, not a symlink to one elsewhere)")
                full = f"{package}.{dotted}"
                module = sys.modules.get(full)
                if module is not None:
                    if getattr(module, "__file__", None) != str(origin):
                        raise _NotInFolder(f"module {dotted!r} was loaded from another file than {origin}")
                    continue
                module = _load_file(full, origin)
                setattr(sys.modules[full.rpartition(".")[0]], parts[depth - 1], module)
        assert module is not None
        return module

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


_LOADING = threading.RLock()  # flows are compiled on threads: one folder module is loaded once


class _NotInFolder(Exception):
    pass


def _load_file(name: str, origin: Path) -> types.ModuleType:
    """Execute `origin` as module `name` (a package when it is an `__init__.py`)."""
    is_package = origin.name == "__init__.py"
    spec = importlib.util.spec_from_file_location(
        name, origin, submodule_search_locations=[str(origin.parent)] if is_package else None)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _modules_in(folder: Path) -> list[str]:
    """The top-level Python modules (files and packages) of `folder` (see `_module_file`)."""
    if not folder.is_dir():
        return []
    names = {p.stem for p in folder.glob("*.py")} | {p.parent.name for p in folder.glob("*/__init__.py")}
    return sorted(name for name in names if _module_file(folder, [name]) is not None)


def _module_file(folder: Path, parts: list[str]) -> Path | None:
    """The file of module `a.b.c` (as `parts`) in `folder`, if it is one of the folder's own.

    As Python does, a package directory `name/` (with an `__init__.py`) comes before a module
    file `name.py`. Each directory on the way and the file itself must really be inside the
    folder: a symlink to a file elsewhere (`helpers.py -> .../subprocess.py`) or a symlinked
    package directory is not a module of the folder. Names of standard-library modules never
    are (at the top), so that `os:popen` can never mean a folder's file.
    """
    if not parts or not all(_NAME.fullmatch(p) for p in parts) or parts[0] in sys.stdlib_module_names:
        return None
    base = folder
    for i, part in enumerate(parts):
        directory = base / part
        init = directory / "__init__.py"
        if directory.is_dir() and init.is_file():
            if directory.resolve() != directory or not init.resolve().is_relative_to(folder):
                return None  # a symlinked package directory, or an __init__.py from elsewhere
            if i == len(parts) - 1:
                return init
            base = directory
            continue
        if i < len(parts) - 1:
            return None  # `a.b` needs `a` to be a package of the folder
        file = base / f"{part}.py"
        if file.is_file() and file.resolve().is_relative_to(folder):
            return file  # (a symlink to another file of the folder is the folder's)
        return None
    return None
