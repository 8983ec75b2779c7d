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
from planner import (
    CacheOptions,
    CallOptions,
    FlowError,
    FlowFileError,
    FlowInputError,
    Planner,
    PoolOptions,
    ReplicaOptions,
    Settings,
    load_flow,
    load_flows,
    run_flow,
)
from planner.config import module_allowed
from planner.errors import DatabaseUnavailable
from planner.flows import QUIET_S
from planner.kinds.backend import Offline

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


def _flow(value: int, *, extra: bool = False) -> str:
    text = f"nodes:\n  a: {{call: tests.nodes:echo, with: {{value: {value}}}}}\n"
    return text + ("  b: {call: tests.nodes:echo, with: {value: 2}}\n" if extra else "")


HOUR_NS = 3600 * 10**9
# A file's mtime as `cp -p`, rsync or a machine whose clock runs ahead leave it: never compared with the clock.
MTIMES: dict[str, Callable[[int], int]] = {
    "future": lambda old: time.time_ns() + HOUR_NS,
    "past": lambda old: time.time_ns() - 24 * HOUR_NS,
    "same as before": lambda old: old,
}


def _replace(path: Path, text: str, *, mtime_ns: int | None = None) -> None:
    """Write `text` elsewhere, then rename it over `path`: complete at once."""
    new = path.with_name(path.name + ".new")
    new.write_text(text)
    if mtime_ns is not None:
        os.utime(new, ns=(mtime_ns, mtime_ns))
    os.replace(new, path)


def _rewrite(path: Path, text: str, *, mtime_ns: int | None = None) -> None:
    """Write `text` into `path` itself (truncate, then write), as `cat >`, scp or `cp -p` do."""
    with path.open("r+") as f:
        f.truncate(0)
        f.write(text)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


async def _after_a_quiet_moment() -> None:
    await asyncio.sleep(QUIET_S + 0.05)  # planner's own monotonic clock must see the file still


@pytest.mark.parametrize("mtime", MTIMES)
async def test_a_file_replaced_by_rename_is_taken_by_the_very_next_run(write_flow: Write, planner: Planner, mtime: str) -> None:
    path = write_flow(_flow(1))
    assert (await planner.run("t")).values["a"] == 1
    _replace(path, _flow(7), mtime_ns=MTIMES[mtime](path.stat().st_mtime_ns))  # same size as before, too
    assert (await planner.run("t")).values["a"] == 7


@pytest.mark.parametrize("mtime", [*MTIMES, "left as written"])
async def test_a_file_rewritten_in_place_is_taken_once_seen_unchanged_for_a_moment(
        write_flow: Write, planner: Planner, mtime: str) -> None:
    path = write_flow(_flow(1))
    assert (await planner.run("t")).values["a"] == 1
    old = path.stat().st_mtime_ns
    _rewrite(path, _flow(22), mtime_ns=MTIMES[mtime](old) if mtime in MTIMES else None)
    assert (await planner.run("t")).values["a"] == 1  # first seen: it may still be being written
    await _after_a_quiet_moment()
    assert (await planner.run("t")).values["a"] == 22


async def test_an_edit_still_being_written_is_not_taken_yet(write_flow: Write, planner: Planner) -> None:
    path = write_flow(_flow(1, extra=True))
    await planner.run("t")
    _rewrite(path, _flow(1))  # half of a longer write
    assert set((await planner.run("t")).values) == {"a", "b"}
    await _after_a_quiet_moment()
    _rewrite(path, _flow(1, extra=True).replace("value: 2", "value: 3"))  # the writer goes on
    assert (await planner.run("t")).values["b"] == 2, "a file that changed since it was last seen is not still"
    await _after_a_quiet_moment()
    assert (await planner.run("t")).values["b"] == 3


async def test_a_deleted_flow_is_gone_and_a_new_file_is_taken_at_once(write_flow: Write, planner: Planner) -> None:
    path = write_flow(_flow(1))
    await planner.run("t")
    path.unlink()
    with pytest.raises(FlowFileError, match="no flow named 't'"):
        await planner.run("t")
    write_flow(_flow(5))
    assert (await planner.run("t")).values["a"] == 5


async def test_a_new_flow_file_is_taken_by_the_next_run(write_flow: Write, planner: Planner) -> None:
    write_flow(_flow(1))
    await planner.run("t")
    write_flow(_flow(9), name="other")
    assert (await planner.run("other")).values["a"] == 9


async def test_a_flow_is_compiled_once_while_unchanged(write_flow: Write, planner: Planner) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:echo}\n")
    assert planner.load("t") is planner.load("t")


async def test_a_broken_edit_keeps_the_last_good_version_and_reports(write_flow: Write, planner: Planner, caplog: pytest.LogCaptureFixture) -> None:
    path = write_flow(_flow(1))
    await planner.run("t")
    _replace(path, "nodes:\n  a: {call: tests.nodes:echo, with: {value: $nope}}\n")
    result = await planner.run("t")
    assert result.values["a"] == 1
    assert "unknown reference $nope" in str(planner.reload_errors["t"])
    assert any("last good version" in r.getMessage() for r in caplog.records)
    _replace(path, _flow(3))
    assert (await planner.run("t")).values["a"] == 3 and "t" not in planner.reload_errors


# A hot edit is checked as `planner validate` checks a file offline before it replaces the
# running version: each spelling below compiles, and would run and answer wrong (or fail) at run time.
BROKEN_EDITS = {
    "SQL that does not parse": ("  p: {sql: SELECT amount FRM payments, fetch: one}\n", "PLN111"),
    "one statement of a list": ("  p:\n    sql: [SELECT 1, SELEC 2]\n    fetch: none\n", "PLN111"),
    "a parameter in the wrong place": ("  p: {sql: 'SELECT * FROM $a', fetch: all}\n", "PLN111"),
    "call arguments that do not fit": ("  p: {call: tests.nodes:add, with: {a: 1, c: 2}}\n", "does not fit"),
}


@pytest.mark.parametrize("edit", BROKEN_EDITS)
async def test_a_hot_edit_that_validate_refuses_never_replaces_the_running_version(
        write_flow: Write, planner: Planner, caplog: pytest.LogCaptureFixture, edit: str) -> None:
    node, why = BROKEN_EDITS[edit]
    path = write_flow(_flow(1))
    assert (await planner.run("t")).values == {"a": 1}
    _replace(path, _flow(2) + node)
    for _ in range(3):
        assert (await planner.run("t")).values == {"a": 1}
    error = planner.reload_errors["t"]
    assert isinstance(error, FlowFileError) and why in f"{error.code} {error}" and error.node == "p"
    reported = [r for r in caplog.records if "last good version" in r.getMessage()]
    assert len(reported) == 1, "a failing edit is reported once, not once per run"
    _replace(path, _flow(2))
    assert (await planner.run("t")).values == {"a": 2} and "t" not in planner.reload_errors


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


@pytest.mark.slow  # compiles a 3,000-node flow three times
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
    planner = Planner(flows=tmp_path, call_options=CallOptions(allowed_modules=["tests"]))
    before = len(gaps)
    await planner.versions.entry("big")  # the load a first run makes, without running 3,000 nodes
    loading.set()
    await tick
    # On the loop, the loop turns about twice while the flow loads (the compile is one stretch).
    # On a thread, it turns all along, between the GIL stretches of the compile (libyaml composing
    # the document holds it longest). A count of turns, not a time: a loaded machine slows both.
    turns = len(gaps) - before
    assert turns >= 20, f"the loop turned {turns} times during a {compile_s * 1000:.0f} ms compile"


async def test_a_broken_edit_is_not_compiled_again_until_it_changes(
    write_flow: Write, planner: Planner, monkeypatch: pytest.MonkeyPatch
) -> None:
    from planner import flows
    from planner.graph import compile_flow

    path = write_flow("nodes:\n  a: {call: tests.nodes:echo, with: {value: 1}}\n")
    await planner.run("t")
    _replace(path, "nodes:\n  a: {call: tests.nodes:echo, with: {value: $nope}}\n")
    compiles: list[object] = []
    real = compile_flow

    def counting(loaded: Any) -> Any:
        compiles.append(loaded)
        return real(loaded)

    monkeypatch.setattr(flows, "compile_flow", counting)
    for _ in range(3):
        assert (await planner.run("t")).values["a"] == 1
    assert len(compiles) == 1


# With the pool open, a hot edit's changed statements are also prepared on the server, as
# `planner validate --db` does: what only the catalog knows is refused too.
SERVER_REFUSED_EDITS = {
    "an unknown table": ("SELECT amount FROM paymnts", "paymnts"),
    "an unknown column": ("SELECT amount_due FROM whatsapp_instances", "amount_due"),
    "an unknown function": ("SELECT no_such_function(1)", "no_such_function"),
    "a type that does not fit": ("SELECT instance_name + 1 FROM whatsapp_instances", "operator does not exist"),
}


@pytest.mark.parametrize("edit", SERVER_REFUSED_EDITS)
async def test_a_hot_edit_the_server_refuses_never_replaces_the_running_version(
        tmp_path: Path, demo_dsn: str, caplog: pytest.LogCaptureFixture, edit: str) -> None:
    sql, why = SERVER_REFUSED_EDITS[edit]
    path = tmp_path / "t.yaml"
    path.write_text("nodes:\n  a: {sql: SELECT 1, fetch: value}\n")
    async with Planner(flows=tmp_path, dsn=demo_dsn) as planner:
        assert (await planner.run("t")).values == {"a": 1}
        _replace(path, f"nodes:\n  a: {{sql: '{sql}', fetch: value}}\n")
        for _ in range(3):
            assert (await planner.run("t")).values == {"a": 1}
        error = planner.reload_errors["t"]
        assert isinstance(error, FlowFileError) and error.code == "PLN400" and error.node == "a" and why in str(error)
        assert len([r for r in caplog.records if "last good version" in r.getMessage()]) == 1
        _replace(path, "nodes:\n  a: {sql: SELECT 2, fetch: value}\n")
        assert (await planner.run("t")).values == {"a": 2} and "t" not in planner.reload_errors


async def test_a_hot_edit_is_taken_when_the_server_cannot_be_asked(
        tmp_path: Path, demo_dsn: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("nodes:\n  a: {sql: SELECT 1, fetch: value}\n")
    async with Planner(flows=tmp_path, dsn=demo_dsn) as planner:
        await planner.run("t")

        async def unavailable(text: str) -> Any:
            raise DatabaseUnavailable("the server is restarting")

        monkeypatch.setattr(planner.stack.primary, "describe", unavailable)
        _replace(path, "nodes:\n  a: {sql: SELECT 2, fetch: value}\n")
        assert (await planner.run("t")).values == {"a": 2}
        assert any("not checked on the server" in r.getMessage() for r in caplog.records)


# --- options in groups ----------------------------------------------------------------------


def test_the_keywords_now_grouped_are_refused_by_name() -> None:
    for old in ("min_size", "max_size", "allowed_modules", "call_threads", "cache_size", "replica_max_lag"):
        with pytest.raises(TypeError, match=old):
            Planner(**{old: 1})  # type: ignore[arg-type]


def test_pool_options_size_each_pool_planner_owns(tmp_path: Path) -> None:
    planner = Planner(flows=tmp_path, dsn="postgresql://primary.invalid/app", replica_dsn="postgresql://replica.invalid/app",
                      pool_options=PoolOptions(min_size=1, max_size=3), settings=Settings())
    assert {role: pool.load.max_size for role, pool in planner.pools.items()} == {"primary": 3, "replica": 3}


def test_cache_options_bound_the_values_kept(tmp_path: Path) -> None:
    planner = Planner(flows=tmp_path, backend=Offline(), cache_options=CacheOptions(size=7, channel=None))
    assert planner.cache_stats().maxsize == 7


def test_replica_options_beat_the_settings(tmp_path: Path) -> None:
    settings = Settings(replica_dsn="postgresql://other.invalid/app", replica_max_lag=5.0)
    given = ReplicaOptions(dsn="postgresql://replica.invalid/app", max_lag="2s")
    planner = Planner(flows=tmp_path, dsn="postgresql://primary.invalid/app", replica_options=given, settings=settings)
    assert planner.replica is not None and planner.replica.max_lag == 2.0
    only_lag = Planner(flows=tmp_path, dsn="postgresql://primary.invalid/app", settings=settings,
                       replica_options=ReplicaOptions(max_lag="1s"))
    assert only_lag.replica is not None and only_lag.replica.max_lag == 1.0  # the settings' DSN, its own lag


def test_the_replicas_dsn_given_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="give the replica's DSN once"):
        Planner(flows=tmp_path, dsn="postgresql://primary.invalid/app", replica_dsn="postgresql://a.invalid/app",
                replica_options=ReplicaOptions(dsn="postgresql://b.invalid/app"))


def test_call_options_set_the_allow_list_and_the_threads(tmp_path: Path) -> None:
    planner = Planner(flows=tmp_path, backend=Offline(),
                      call_options=CallOptions(threads=3, wait=0.5, allowed_modules=["tests"]))
    assert (planner.allowed, planner.threads.size, planner.threads.wait_s) == (["tests"], 3, 0.5)
