"""The public API: exports, Planner's flow cache and reloads, the call allow-list, run_flow."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import planner as planner_pkg
from planner import FlowError, FlowFileError, FlowInputError, Planner, load_flow, load_flows, run_flow
from planner.api import QUIET_S
from planner.config import module_allowed

Write = Callable[..., Path]


def test_the_public_api_is_exactly_all() -> None:
    import types

    public = {name for name, value in vars(planner_pkg).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert public == set(planner_pkg.__all__)
    assert planner_pkg.__all__ == sorted(planner_pkg.__all__)


def test_every_error_is_a_flow_error() -> None:
    for name in planner_pkg.__all__:
        obj = getattr(planner_pkg, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, FlowError), name


def _edit(path: Path, text: str, *, age_s: float = 1.0) -> None:
    """Write `text` as an editor would, last changed `age_s` ago."""
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - int(age_s * 1e9)))


async def test_an_edited_flow_is_picked_up_on_the_next_run(write_flow: Write, planner: Planner) -> None:
    path = write_flow("nodes:\n  a: {call: tests.nodes:echo, with: {value: 1}}\n")
    assert (await planner.run("t")).values["a"] == 1
    _edit(path, "nodes:\n  a: {call: tests.nodes:echo, with: {value: 22}}\n")
    assert (await planner.run("t")).values["a"] == 22


async def test_an_edit_still_being_written_is_not_taken_yet(write_flow: Write, planner: Planner) -> None:
    path = write_flow("nodes:\n  a: {call: tests.nodes:echo, with: {value: 1}}\n  b: {call: tests.nodes:echo, with: {value: 2}}\n")
    await planner.run("t")
    path.write_text("nodes:\n  a: {call: tests.nodes:echo, with: {value: 1}}\n")  # half of a longer write
    assert set((await planner.run("t")).values) == {"a", "b"}
    _edit(path, "nodes:\n  a: {call: tests.nodes:echo, with: {value: 1}}\n", age_s=QUIET_S + 0.1)
    assert set((await planner.run("t")).values) == {"a"}


async def test_a_flow_is_compiled_once_while_unchanged(write_flow: Write, planner: Planner) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:echo}\n")
    assert planner.load("t") is planner.load("t")


async def test_a_broken_edit_keeps_the_last_good_version_and_reports(write_flow: Write, planner: Planner, caplog: pytest.LogCaptureFixture) -> None:
    path = write_flow("nodes:\n  a: {call: tests.nodes:echo, with: {value: 1}}\n")
    await planner.run("t")
    _edit(path, "nodes:\n  a: {call: tests.nodes:echo, with: {value: $nope}}\n")
    result = await planner.run("t")
    assert result.values["a"] == 1
    assert "unknown reference $nope" in str(planner.reload_errors["t"])
    assert any("last good version" in r.getMessage() for r in caplog.records)
    _edit(path, "nodes:\n  a: {call: tests.nodes:echo, with: {value: 3}}\n")
    assert (await planner.run("t")).values["a"] == 3 and "t" not in planner.reload_errors


async def test_a_broken_flow_with_no_good_version_raises(write_flow: Write, planner: Planner) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:echo, with: {value: $nope}}\n")
    with pytest.raises(FlowFileError):
        await planner.run("t")


async def test_an_unknown_flow_is_a_flow_file_error(planner: Planner) -> None:
    with pytest.raises(FlowFileError, match="no flow named 'missing'"):
        await planner.run("missing")


async def test_a_flow_name_cannot_walk_out_of_the_folder(planner: Planner) -> None:
    with pytest.raises(FlowInputError):
        await planner.run("../etc/passwd")


@pytest.mark.parametrize(
    ("target", "why"),
    [
        pytest.param("os:system", "not allowed", id="os-system"),
        pytest.param("builtins:eval", "not allowed", id="builtins-eval"),
        pytest.param("tests.nodes:os.system", "must look like", id="attribute-walk"),
        pytest.param(".nodes:echo", "must look like", id="relative"),
        pytest.param("tests_evil:echo", "not allowed", id="prefix-trick"),
        pytest.param("tests.nodes:not_a_function", "not a function defined in", id="builtin-alias"),
        pytest.param("tests.nodes:asyncio", "not a function defined in", id="module-attribute"),
        pytest.param("tests.nodes:missing", "has no function", id="missing"),
        pytest.param("tests.nodes:Any", "not a function defined in", id="imported-name"),
    ],
)
async def test_call_targets_outside_the_allow_list_are_refused(write_flow: Write, planner: Planner, target: str, why: str) -> None:
    path = write_flow(f"nodes:\n  a:\n    call: '{target}'\n")
    with pytest.raises(FlowFileError, match=why) as info:
        await planner.run("t")
    assert info.value.node == "a" and info.value.line == 3 and info.value.file == str(path)


async def test_with_keys_are_checked_against_the_signature(write_flow: Write, planner: Planner) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:add, with: {a: 1, c: 2}}\n")
    with pytest.raises(FlowFileError, match="does not fit"):
        await planner.run("t")


def test_a_package_allows_its_submodules_only() -> None:
    assert module_allowed("myflows.tasks", ["myflows"])
    assert module_allowed("myflows", ["myflows"])
    assert not module_allowed("myflows_evil", ["myflows"])
    assert not module_allowed("my", ["myflows"])


async def test_the_allow_list_comes_from_the_environment(write_flow: Write, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:echo}\n")
    monkeypatch.setenv("PLANNER_ALLOWED_MODULES", "planner.demo")
    with pytest.raises(FlowFileError, match="not allowed"):
        await Planner(flows=tmp_path).run("t")
    monkeypatch.setenv("PLANNER_ALLOWED_MODULES", "tests.nodes, other")
    assert (await Planner(flows=tmp_path).run("t")).status == "ok"


async def test_modules_next_to_the_flows_are_allowed_by_default(write_flow: Write, tmp_path: Path) -> None:
    (tmp_path / "localrules.py").write_text("async def double(x):\n    return 2 * x\n")
    write_flow("nodes:\n  a: {call: localrules:double, with: {x: 4}}\n")
    assert (await Planner(flows=tmp_path).run("t")).values["a"] == 8


async def test_run_flow_uses_planner_flows(write_flow: Write, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_flow("nodes:\n  a: {call: localmod:f}\n", name="hello")
    (tmp_path / "localmod.py").write_text("async def f():\n    return 'hi'\n")
    monkeypatch.setenv("PLANNER_FLOWS", os.fspath(tmp_path))
    import planner.api

    monkeypatch.setattr(planner.api, "_default", type(planner.api._default)())
    assert (await run_flow("hello")).output == {"a": "hi"}


async def test_a_closed_planner_refuses_to_run(write_flow: Write, planner: Planner) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:echo}\n")
    async with planner:
        pass
    with pytest.raises(FlowError, match="closed"):
        await planner.run("t")


def test_load_flows_reads_a_folder(write_flow: Write, tmp_path: Path) -> None:
    write_flow("nodes:\n  a: {sql: SELECT 1}\n", name="one")
    write_flow("nodes:\n  b: {sql: SELECT 2}\n", name="two")
    assert sorted(load_flows(tmp_path)) == ["one", "two"]


async def test_a_flow_is_compiled_off_the_event_loop(tmp_path: Path) -> None:
    # A large flow takes a while to compile; the loop must go on serving other runs meanwhile.
    lines = ["nodes:"] + [f"  n{i}: {{call: tests.nodes:echo, with: {{value: {i}, prev: $n{i - 1}}}}}" if i else
                          "  n0: {call: tests.nodes:echo, with: {value: 0}}" for i in range(3000)]
    (tmp_path / "big.yaml").write_text("\n".join(lines) + "\n")
    compile_s = float("inf")
    for _ in range(2):  # warm: the reference is what a compile costs, not a first import
        t0 = time.perf_counter()
        load_flow(tmp_path / "big.yaml")
        compile_s = min(compile_s, time.perf_counter() - t0)
    gaps: list[float] = []
    loading = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not loading.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)  # the ticker is ticking
    planner = Planner(flows=tmp_path, allowed_modules=["tests"])
    await planner._entry("big")  # the load a first run makes, without running 3,000 nodes
    loading.set()
    await tick
    # On the loop, the stall is the whole compile (and more: binding). On a thread, it is the
    # longest stretch the compile holds the GIL in one C call (libyaml composing the document).
    assert max(gaps) < 0.6 * compile_s, f"the loop stalled {max(gaps) * 1000:.0f} ms of a {compile_s * 1000:.0f} ms compile"


async def test_a_broken_edit_is_not_compiled_again_until_it_changes(
    write_flow: Write, planner: Planner, monkeypatch: pytest.MonkeyPatch
) -> None:
    from planner import api
    from planner.graph import compile_flow

    path = write_flow("nodes:\n  a: {call: tests.nodes:echo, with: {value: 1}}\n")
    await planner.run("t")
    _edit(path, "nodes:\n  a: {call: tests.nodes:echo, with: {value: $nope}}\n")
    compiles: list[object] = []
    real = compile_flow

    def counting(loaded: Any) -> Any:
        compiles.append(loaded)
        return real(loaded)

    monkeypatch.setattr(api, "compile_flow", counting)
    for _ in range(3):
        assert (await planner.run("t")).values["a"] == 1
    assert len(compiles) == 1
