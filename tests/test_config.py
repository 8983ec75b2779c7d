"""Configuration resolved once per Planner (`planner.config`): flows folders, the modules next
to them, and the allow-list of `call:` targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from planner import CallOptions, FlowFileError, Planner
from planner.config import DEFAULT_ALLOWED, CallTargets
from planner.kinds.backend import Offline
from planner.settings import Settings, SettingsError
from planner.views.validate import check_static

ROOT = Path(__file__).resolve().parent.parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _folder(root: Path, files: dict[str, str], flow: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    (root / "f.yaml").write_text(textwrap.dedent(flow))
    return root


_HELPERS_FLOW = "nodes:\n  a: {call: 'helpers:which'}\n"


async def test_two_planners_with_same_named_folder_modules_each_get_their_own(tmp_path: Path) -> None:
    one = _folder(tmp_path / "one", {"helpers.py": "def which():\n    return 'one'\n"}, _HELPERS_FLOW)
    two = _folder(tmp_path / "two", {"helpers.py": "def which():\n    return 'two'\n"}, _HELPERS_FLOW)
    first, second = Planner(flows=one, backend=Offline()), Planner(flows=two, backend=Offline())
    assert (await first.run("f")).values == {"a": "one"}
    assert (await second.run("f")).values == {"a": "two"}
    assert (await first.run("f")).values == {"a": "one"}  # the second import changed nothing of the first
    assert "helpers" not in sys.modules


async def test_creating_and_running_a_planner_leaves_sys_path_alone(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "flows", {"helpers.py": "def which():\n    return 'mine'\n"}, _HELPERS_FLOW)
    before = list(sys.path)
    planner = Planner(flows=folder, backend=Offline())
    assert sys.path == before
    assert (await planner.run("f")).values == {"a": "mine"}
    assert sys.path == before
    assert str(folder) not in sys.path and str(folder.resolve()) not in sys.path


async def test_an_explicit_allow_list_naming_a_folder_module_still_imports_it(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "flows", {"helpers.py": "def which():\n    return 'folder'\n"}, _HELPERS_FLOW)
    planner = Planner(flows=folder, backend=Offline(), call_options=CallOptions(allowed_modules=["tests", "helpers"]))
    assert (await planner.run("f")).values == {"a": "folder"}


async def test_an_explicit_allow_list_without_the_folder_module_refuses_it(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "flows", {"helpers.py": "def which():\n    return 'folder'\n"}, _HELPERS_FLOW)
    planner = Planner(flows=folder, backend=Offline(), call_options=CallOptions(allowed_modules=["tests"]))
    with pytest.raises(FlowFileError, match="module 'helpers' is not allowed"):
        await planner.run("f")


async def test_the_allow_list_from_the_environment_may_name_a_folder_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _folder(tmp_path / "flows", {"helpers.py": "def which():\n    return 'env'\n"}, _HELPERS_FLOW)
    monkeypatch.setenv("PLANNER_ALLOWED_MODULES", "helpers")
    assert (await Planner(flows=folder, backend=Offline()).run("f")).values == {"a": "env"}


async def test_a_folder_module_imports_a_sibling_relatively(tmp_path: Path) -> None:
    folder = _folder(
        tmp_path / "flows",
        {
            "helpers.py": "from . import util\nfrom .pkg.deep import answer\n\ndef which():\n    return util.name() + answer()\n",
            "util.py": "def name():\n    return 'util+'\n",
            "pkg/__init__.py": "",
            "pkg/deep.py": "def answer():\n    return 'deep'\n",
        },
        _HELPERS_FLOW,
    )
    assert (await Planner(flows=folder, backend=Offline()).run("f")).values == {"a": "util+deep"}


async def test_a_folder_package_is_a_module_of_the_folder(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "flows", {"tasks/__init__.py": "def which():\n    return 'package'\n"},
                     "nodes:\n  a: {call: 'tasks:which'}\n")
    assert (await Planner(flows=folder, backend=Offline()).run("f")).values == {"a": "package"}


# --- what is not a module of the folder ------------------------------------------------------


def _fresh_folder(tmp_path: Path, flow: str) -> Path:
    # A folder name never used before in this process: its private package does not exist yet,
    # so this is the first load of anything from it.
    folder = tmp_path / f"first_load_{os.getpid()}"
    folder.mkdir()
    (folder / "f.yaml").write_text(flow)
    return folder


def _loaded_from(folder: Path) -> list[str]:
    """Modules imported from a file of `folder` (through a symlink or not)."""
    where = (str(folder), str(folder.resolve()))
    return [name for name, module in list(sys.modules.items())
            if str(getattr(module, "__file__", None) or "").startswith(where)]


async def test_a_symlink_to_a_stdlib_module_is_not_a_folder_module_even_on_first_load(tmp_path: Path) -> None:
    folder = _fresh_folder(tmp_path, "nodes:\n  a: {call: 'helpers:getoutput', with: {cmd: 'echo pwned'}}\n")
    (folder / "helpers.py").symlink_to(STDLIB / "subprocess.py")
    assert not _loaded_from(folder)
    planner = Planner(flows=folder, backend=Offline())
    assert "helpers" not in planner.allowed
    with pytest.raises(FlowFileError, match="module 'helpers' is not allowed"):
        await planner.run("f")
    assert not _loaded_from(folder)


async def test_a_folder_module_swapped_for_a_symlink_before_its_first_load_is_refused(tmp_path: Path) -> None:
    folder = _fresh_folder(tmp_path, "nodes:\n  a: {call: 'helpers:getoutput', with: {cmd: 'echo pwned'}}\n")
    (folder / "helpers.py").write_text("def getoutput(cmd):\n    return 'harmless'\n")
    planner = Planner(flows=folder, backend=Offline())
    assert "helpers" in planner.allowed  # a module of the folder when the Planner was made
    (folder / "helpers.py").unlink()
    (folder / "helpers.py").symlink_to(STDLIB / "subprocess.py")
    with pytest.raises(FlowFileError, match="helpers"):
        await planner.run("f")
    assert not _loaded_from(folder)


async def test_a_symlinked_package_dir_beside_a_real_module_of_that_name_is_never_imported(tmp_path: Path) -> None:
    # Python imports a package directory before a module file of the same name.
    outside = tmp_path / "outside" / "pkg"
    outside.mkdir(parents=True)
    (outside / "__init__.py").write_text("def which():\n    return 'outside'\n")
    folder = _fresh_folder(tmp_path, _HELPERS_FLOW)
    (folder / "helpers.py").write_text("def which():\n    return 'inside'\n")
    (folder / "helpers").symlink_to(outside, target_is_directory=True)
    planner = Planner(flows=folder, backend=Offline())
    try:
        value = (await planner.run("f")).values["a"]
    except FlowFileError:
        value = "refused"
    assert value in ("inside", "refused")
    assert not _loaded_from(outside)


async def test_a_symlinked_submodule_of_a_folder_package_is_refused(tmp_path: Path) -> None:
    folder = _fresh_folder(tmp_path, "nodes:\n  a: {call: 'tasks.sub:getoutput', with: {cmd: 'echo pwned'}}\n")
    (folder / "tasks").mkdir()
    (folder / "tasks" / "__init__.py").write_text("")
    (folder / "tasks" / "sub.py").symlink_to(STDLIB / "subprocess.py")
    planner = Planner(flows=folder, backend=Offline())
    with pytest.raises(FlowFileError, match="tasks.sub"):
        await planner.run("f")
    assert not [name for name in _loaded_from(folder) if name.endswith(".sub")]


async def test_a_real_submodule_of_a_folder_package_is_allowed(tmp_path: Path) -> None:
    folder = _fresh_folder(tmp_path, "nodes:\n  a: {call: 'tasks.sub:which'}\n")
    (folder / "tasks").mkdir()
    (folder / "tasks" / "__init__.py").write_text("")
    (folder / "tasks" / "sub.py").write_text("from .. import util\n\ndef which():\n    return util.NAME\n")
    (folder / "util.py").write_text("NAME = 'sub'\n")
    assert (await Planner(flows=folder, backend=Offline()).run("f")).values == {"a": "sub"}


async def test_a_symlink_to_another_file_of_the_folder_is_a_folder_module(tmp_path: Path) -> None:
    folder = _fresh_folder(tmp_path, _HELPERS_FLOW)
    (folder / "real_helpers.py").write_text("def which():\n    return 'aliased'\n")
    (folder / "helpers.py").symlink_to(folder / "real_helpers.py")
    assert (await Planner(flows=folder, backend=Offline()).run("f")).values == {"a": "aliased"}


async def test_a_symlinked_package_dir_is_not_a_folder_module(tmp_path: Path) -> None:
    folder = _fresh_folder(tmp_path, "nodes:\n  a: {call: 'codec:dumps', with: {obj: 1}}\n")
    (folder / "codec").symlink_to(STDLIB / "json", target_is_directory=True)
    planner = Planner(flows=folder, backend=Offline())
    assert "codec" not in planner.allowed
    with pytest.raises(FlowFileError, match="module 'codec' is not allowed"):
        await planner.run("f")


async def test_a_symlinked_package_dir_pointing_inside_the_folder_is_not_a_second_name(tmp_path: Path) -> None:
    folder = _fresh_folder(tmp_path, "nodes:\n  a: {call: 'alias:which'}\n")
    (folder / "real").mkdir()
    (folder / "real" / "__init__.py").write_text("def which():\n    return 'real'\n")
    (folder / "alias").symlink_to(folder / "real", target_is_directory=True)
    assert CallTargets(folder=folder).local == ["real"]


async def test_a_folder_file_named_like_a_stdlib_module_is_not_a_folder_module(tmp_path: Path) -> None:
    folder = _fresh_folder(tmp_path, "nodes:\n  a: {call: 'json:dumps', with: {obj: 1}}\n")
    (folder / "json.py").write_text("def dumps(obj):\n    return 'shadowed'\n")
    planner = Planner(flows=folder, backend=Offline())
    assert "json" not in planner.allowed
    with pytest.raises(FlowFileError, match="module 'json' is not allowed"):
        await planner.run("f")


# --- the default allow-list ------------------------------------------------------------------

_DEMO_LOADERS = ["planner.demo.data:ensure", "planner.demo.data:load", "planner.demo.run:main_sync", "planner.db.pool:drop_database"]


@pytest.mark.parametrize("target", _DEMO_LOADERS)
async def test_the_default_allow_list_refuses_planners_own_functions_outside_the_escalation_rules(tmp_path: Path, target: str) -> None:
    folder = _fresh_folder(tmp_path, f"nodes:\n  a: {{call: '{target}', with: {{dsn: 'postgresql://x/y'}}}}\n")
    module = target.split(":")[0]
    with pytest.raises(FlowFileError, match=f"module '{module}' is not allowed") as info:
        await Planner(flows=folder, backend=Offline()).run("f")
    assert info.value.code == "PLN300"


def test_the_default_allow_list_is_the_escalation_rules_only() -> None:
    assert DEFAULT_ALLOWED == ("planner.demo.escalation",)
    targets = CallTargets()
    assert targets.resolve("planner.demo.escalation:needs_escalation").__name__ == "needs_escalation"
    for target in _DEMO_LOADERS:
        with pytest.raises(ValueError, match="is not allowed"):
            targets.resolve(target)


@pytest.mark.parametrize("target", ["planner.demo.data:ensure", "planner.demo.data:load"])
def test_validate_reports_a_refused_call_target(tmp_path: Path, target: str) -> None:
    path = tmp_path / "f.yaml"
    path.write_text(f"nodes:\n  a:\n    call: '{target}'\n    with: {{dsn: 'postgresql://x/y'}}\n")
    _, findings = check_static(path)
    assert [(f.node, f.code, f.line) for f in findings] == [("a", "PLN300", 3)]
    assert "module 'planner.demo.data' is not allowed" in findings[0].message


@pytest.mark.subprocess
def test_planner_validate_on_the_command_line_reports_a_refused_call_target(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text("nodes:\n  a:\n    call: 'planner.demo.data:ensure'\n    with: {dsn: 'postgresql://x/y'}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", "PLANNER_HOME": str(tmp_path / "home")}
    env.pop("PLANNER_ALLOWED_MODULES", None)
    proc = subprocess.run([sys.executable, "-m", "planner", "validate", str(path), "--format", "json"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1, proc.stderr
    findings = json.loads(proc.stdout)["findings"]
    assert [(f["node"], f["code"], f["line"]) for f in findings] == [("a", "PLN300", 3)]
    assert "planner.demo.data" in findings[0]["message"] and "not allowed" in findings[0]["message"]


# --- Settings: the environment, read once at the edge ---------------------------------------

_EVERY_VARIABLE = {
    "PLANNER_FLOWS": "/srv/flows", "PLANNER_MODE": "sequential", "PLANNER_ON_ERROR": "FAIL",
    "PLANNER_ALLOWED_MODULES": "myflows, other", "PLANNER_COALESCE": "0", "PLANNER_FUSE": "off",
    "PLANNER_CACHE": "no", "PLANNER_COMPILE": "false", "PLANNER_METRICS": "0", "PLANNER_EMBEDDED": "0",
    "PLANNER_POOLER": "transaction", "DATABASE_URL": "postgresql://db/app",
    "DATABASE_REPLICA_URL": "postgresql://replica/app", "PLANNER_REPLICA_MAX_LAG": "500ms",
}


def test_settings_from_an_empty_environment_are_the_defaults() -> None:
    assert Settings.from_env({}) == Settings()


def test_settings_read_every_variable() -> None:
    assert Settings.from_env(_EVERY_VARIABLE) == Settings(
        flows=Path("/srv/flows"), mode="sequential", on_error="fail", allowed_modules=("myflows", "other"),
        coalesce=False, fuse=False, cache=False, compile=False, metrics=False, embedded=False,
        pooler="transaction", database_url="postgresql://db/app", replica_dsn="postgresql://replica/app",
        replica_max_lag=0.5)


def test_settings_read_the_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANNER_FUSE", "0")
    assert Settings.from_env().fuse is False


def test_an_allow_list_set_empty_allows_nothing_and_unset_allows_the_default() -> None:
    assert Settings.from_env({"PLANNER_ALLOWED_MODULES": ""}).allowed_modules == ()
    assert Settings.from_env({}).allowed_modules is None


@pytest.mark.parametrize(("name", "value", "says"), [
    ("PLANNER_MODE", "parallel", "PLANNER_MODE='parallel': choose eager, layered or sequential"),
    ("PLANNER_ON_ERROR", "failure", "PLANNER_ON_ERROR='failure': choose default or fail"),
    ("PLANNER_CACHE", "maybe", "PLANNER_CACHE='maybe': expected 1, true, on or yes"),
    ("PLANNER_COALESCE", "2", "PLANNER_COALESCE='2'"),
    ("PLANNER_FUSE", "nope", "PLANNER_FUSE='nope'"),
    ("PLANNER_COMPILE", "y", "PLANNER_COMPILE='y'"),
    ("PLANNER_METRICS", "enabled", "PLANNER_METRICS='enabled'"),
    ("PLANNER_EMBEDDED", "never", "PLANNER_EMBEDDED='never'"),
    ("PLANNER_POOLER", "statement", "PLANNER_POOLER 'statement': a statement-mode pooler"),
    ("PLANNER_POOLER", "transactoin", "PLANNER_POOLER 'transactoin': expected 'transaction'"),
    ("PLANNER_REPLICA_MAX_LAG", "soon", "PLANNER_REPLICA_MAX_LAG='soon'"),
])
def test_a_bad_variable_is_refused_naming_it(name: str, value: str, says: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({name: value})
    assert says in str(info.value)
    assert isinstance(info.value, ValueError)


async def test_a_planner_given_settings_ignores_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in _EVERY_VARIABLE.items():
        monkeypatch.setenv(name, value)
    planner = Planner(flows=tmp_path, backend=Offline(), settings=Settings())
    assert planner.settings == Settings() and planner.on_error == "default"
    assert planner.cache_stats().enabled is True and planner.metrics is not None
    assert planner.allowed == list(DEFAULT_ALLOWED)


def test_a_planner_made_without_settings_reads_the_environment_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANNER_CACHE", "0")
    planner = Planner(flows=tmp_path, backend=Offline())
    monkeypatch.setenv("PLANNER_CACHE", "1")  # too late for this planner: the next one takes it
    assert planner.settings.cache is False and planner.cache_stats().enabled is False
    assert Planner(flows=tmp_path, backend=Offline()).cache_stats().enabled is True


def test_the_planners_own_arguments_beat_its_settings(tmp_path: Path) -> None:
    settings = Settings(flows=tmp_path / "elsewhere", on_error="fail", allowed_modules=("x",), metrics=False)
    planner = Planner(flows=tmp_path,
                      backend=Offline(),
                      settings=settings,
                      on_error="default",
                      metrics=True,
                      call_options=CallOptions(allowed_modules=["tests"]))
    assert (planner.flows_dir, planner.on_error, planner.allowed) == (tmp_path, "default", ["tests"])
    assert planner.metrics is not None
    assert Planner(backend=Offline(), settings=settings).flows_dir == tmp_path / "elsewhere"


@pytest.mark.subprocess
def test_the_command_line_says_which_variable_is_bad(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", "PLANNER_HOME": str(tmp_path / "home"),
           "PLANNER_COMPILE": "perhaps"}
    (tmp_path / "f.yaml").write_text("nodes: {a: {sql: SELECT 1, fetch: value}}\n")
    proc = subprocess.run([sys.executable, "-m", "planner", "explain", "f", "--flows", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("planner: PLANNER_COMPILE='perhaps'"), proc.stderr
