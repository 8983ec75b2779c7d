"""The package as users get it.

The sdist is built from this checkout and the wheel from the unpacked sdist (what
`python -m build` does), both with the dev environment's hatchling, so nothing is downloaded.
The wheel is installed, not editable, into a fresh virtual environment that borrows its
dependencies from the dev environment's site-packages (a `.pth` line, which adds the folder
without running its `.pth` files, so the checkout's editable install stays out), and the
`planner` command and the package are run from a folder outside the checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import planner
from planner.db.admin import with_database

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
NAME: str = PROJECT["name"]
VERSION: str = PROJECT["version"]
STEM = f"{NAME.replace('-', '_')}-{VERSION}"  # how wheel and sdist file names spell the distribution


def _run(args: list[str | Path], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"{proc.args}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


@dataclass(frozen=True)
class Dists:
    sdist: Path
    wheel: Path


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    out = tmp_path_factory.mktemp("dist")
    _ok(_run([sys.executable, "-m", "hatchling", "build", "-t", "sdist", "-d", out], cwd=ROOT))
    (sdist,) = out.glob("*.tar.gz")
    unpacked = tmp_path_factory.mktemp("sdist")
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4 and later
            tar.extractall(unpacked, filter="data")
        else:  # pragma: no cover - our own sdist, just built
            tar.extractall(unpacked)
    _ok(_run([sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", out], cwd=unpacked / STEM))
    (wheel,) = out.glob("*.whl")
    return Dists(sdist, wheel)


def test_the_distribution_files_carry_the_distribution_name_and_version(dists: Dists) -> None:
    assert NAME == "planner-flows"  # "planner" on PyPI is someone else's project
    assert dists.sdist.name == f"{STEM}.tar.gz"
    assert dists.wheel.name == f"{STEM}-py3-none-any.whl"


def test_the_sdist_carries_sources_tests_docs_and_the_license(dists: Dists) -> None:
    with tarfile.open(dists.sdist) as tar:
        names = {name.removeprefix(f"{STEM}/") for name in tar.getnames()}
        pkg_info = tar.extractfile(f"{STEM}/PKG-INFO").read().decode()  # type: ignore[union-attr]
    assert {"LICENSE", "README.md", "CHANGELOG.md", "BENCHMARKS.md", "pyproject.toml", "planner/__init__.py",
            "planner/py.typed", "flows/escalation.yaml", "flows/process_buffered.yaml", "tests/conftest.py",
            "tests/test_packaging.py", "tests/data/bad_flows/cycle_self.yaml", "benchmarks/seed_table.py",
            "docs/flows.md", "docs/architecture.md", "docs/reliability.md"} <= names
    assert not [n for n in names if n.startswith((".venv/", "dist/")) or "__pycache__" in n or n.endswith(".pyc")]
    assert f"Name: {NAME}\n" in pkg_info and f"Version: {VERSION}\n" in pkg_info
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_the_wheel_contains_the_data_files_license_and_metadata(dists: Dists) -> None:
    with zipfile.ZipFile(dists.wheel) as whl:
        names = set(whl.namelist())
        meta = whl.read(f"{STEM}.dist-info/METADATA").decode()
        entry_points = whl.read(f"{STEM}.dist-info/entry_points.txt").decode()
        license_text = whl.read(f"{STEM}.dist-info/licenses/LICENSE").decode()
    assert {"planner/py.typed", "planner/flow.schema.json", "planner/demo/schema.sql",
            "planner/_flows/process_buffered.yaml", "planner/_flows/escalation.yaml"} <= names
    assert not [n for n in names if n.startswith(("tests/", "docs/", "benchmarks/", "flows/"))]
    assert license_text == (ROOT / "LICENSE").read_text()
    for line in (f"Name: {NAME}", f"Version: {VERSION}", "License-Expression: MIT", "License-File: LICENSE",
                 "Requires-Python: >=3.11", "Classifier: Programming Language :: Python :: 3.11", "Classifier: Typing :: Typed"):
        assert f"\n{line}\n" in meta, line
    assert "[console_scripts]\nplanner = planner.cli:main" in entry_points
    assert "[pytest11]\nplanner = planner.testing.pytest_plugin" in entry_points


@dataclass(frozen=True)
class Installed:
    bin: Path
    site_packages: Path
    env: dict[str, str]
    outside: Path  # the working folder: not the checkout


@pytest.fixture(scope="module")
def installed(dists: Dists, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    venv = tmp_path_factory.mktemp("venv")
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=venv))
    py = venv / "bin" / "python"
    site_packages = Path(_ok(_run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=venv)).stdout.strip())
    dev = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (site_packages / "_dev_site_packages.pth").write_text("".join(f"{p}\n" for p in dev))
    outside = tmp_path_factory.mktemp("elsewhere")
    home = tmp_path_factory.mktemp("planner-home")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PLANNER_FLOWS", "PLANNER_MODE", "DATABASE_URL")}
    env |= {"PLANNER_HOME": str(home), "NO_COLOR": "1", "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    # pip comes from the dev environment through the .pth line; --ignore-installed so it never
    # looks at (or uninstalls) a planner installed there.
    _ok(_run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", dists.wheel], cwd=outside, env=env))
    yield Installed(venv / "bin", site_packages, env, outside)
    assert not (home / "pgdata").exists(), "an embedded server was started in the test's PLANNER_HOME"


def test_the_installed_package_is_the_wheel_with_one_version(installed: Installed) -> None:
    script = (
        "import importlib.metadata, importlib.resources, json, planner\n"
        "flows = importlib.resources.files('planner') / '_flows'\n"
        "print(json.dumps({'file': planner.__file__, 'version': planner.__version__,\n"
        f"    'metadata': importlib.metadata.version({NAME!r}),\n"
        "    'py_typed': (importlib.resources.files('planner') / 'py.typed').is_file(),\n"
        "    'groups': planner.load_flow(flows / 'escalation.yaml').groups,\n"
        "    'public': sorted(n for n in planner.__all__ if hasattr(planner, n))}))\n"
    )
    found = json.loads(_ok(_run([installed.bin / "python", "-c", script], cwd=installed.outside, env=installed.env)).stdout)
    assert Path(found["file"]) == installed.site_packages / "planner" / "__init__.py"
    assert found["version"] == found["metadata"] == VERSION
    assert found["py_typed"] is True
    assert found["groups"] == [["settings", "interactions"], ["decide"], ["record"]]
    assert found["public"] == sorted(planner.__all__)


def test_planner_version_prints_the_pyproject_version(installed: Installed) -> None:
    proc = _ok(_run([installed.bin / "planner", "--version"], cwd=installed.outside, env=installed.env))
    assert proc.stdout == f"planner {VERSION}\n"
    assert proc.stderr == ""


def test_the_installed_demo_runs_and_the_packaged_flows_validate_on_its_database(installed: Installed, planner_pg: str) -> None:
    demo = _ok(_run([installed.bin / "planner", "demo", "--rtt", "0", "--runs", "2", "--db", planner_pg],
                    cwd=installed.outside, env=installed.env))
    assert "groups: instance; conversation, webhook_config, is_escalated; is_duplicate, history, recent_messages" in demo.stdout
    assert "groups: settings, interactions; decide; record" in demo.stdout
    assert demo.stdout.count("local database, no network delay") == 2
    for mode in ("eager", "layered", "sequential"):
        assert demo.stdout.count(f"\n{mode} ") == 2, mode

    flows = installed.site_packages / "planner" / "_flows"
    proc = _run([installed.bin / "planner", "validate", "--flows", flows, "--db", with_database(planner_pg, "planner_demo")],
                cwd=installed.outside, env=installed.env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.strip() == "planner: 2 flow(s) ok"


def test_the_version_comes_from_pyproject_without_an_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A checkout on sys.path with no installed metadata reads pyproject.toml beside the package."""
    import importlib.metadata

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert planner._version() == VERSION
    monkeypatch.setattr(planner, "__file__", str(tmp_path / "planner" / "__init__.py"))
    assert planner._version() == "0+unknown"  # no pyproject.toml there
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "planner"\nversion = "9.9"\n')
    assert planner._version() == "0+unknown"  # someone else's pyproject
    (tmp_path / "pyproject.toml").write_text(f'[project]\nname = "{NAME}"\nversion = "9.9"\n')
    assert planner._version() == "9.9"
