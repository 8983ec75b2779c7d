"""Metrics: what a service graphs and alerts on, as OpenTelemetry instruments and as Prometheus text.

`Metrics` is a run recorder (runs, node outcomes, latencies, statements and round trips per
run, batch and fused sizes: each run recorded once, when it ends, from its records; see
`planner.run.observers.RunRecorder`) and a registry of *sources*: objects read when the metrics are
collected (a Planner's pools, cache and sync-call threads), so nothing is threaded through the
backends but two small hooks that time the waits (`PoolLoad.on_wait`, `CallThreads.on_wait`).

Two forms of the same figures:

- **Prometheus text** (`Metrics.text()`, `planner.metrics_text()` for the process-wide one): the exposition format
  version 0.0.4, for a `/metrics` route of a service without a collector. Written here rather
  than with `prometheus_client`: the format is small and stable, a second registry would
  have to be kept in step with this one, and `prometheus_client`'s process-wide default
  registry refuses a second family of one name (every Planner of a test suite would collide).
- **OpenTelemetry** (`opentelemetry-api`, the `otel` extra): the same names with dots
  (`planner.node.duration`, unit `s`), recorded on the global meter provider (or the one
  given), so an SDK's Prometheus or OTLP exporter shows them as `planner_node_duration_seconds`
  and so on. Without an SDK the API records nothing.

Labels are the same in both forms: `flow`, `node`, `outcome` (ok, defaulted, skipped, failed,
cancelled), `status` (ok, failed, timeout, unavailable, invalid_input), `pool` (primary,
replica), `state`. Flow and node names come from the flow files, so their number is bounded
by the service's own flows. Parameters and values are never labels.
"""

from __future__ import annotations

import math
import weakref
from bisect import bisect_left as _bisect
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from planner.errors import NotFound
from planner.results import NodeState
from planner.run.families import BY_NAME
from planner.run.families import COUNTS as COUNTS  # the table moved to families.py; its names stay importable here
from planner.run.families import FAMILIES as FAMILIES
from planner.run.families import SECONDS as SECONDS
from planner.run.families import Family as Family
from planner.run.families import Kind as Kind
from planner.run.families import Labels as Labels
from planner.run.families import Sample as Sample

if TYPE_CHECKING:
    from planner.kinds.call import CallThreads
    from planner.run.ledger import Ledger

try:
    from opentelemetry import metrics as otel_metrics
    from opentelemetry.metrics import CallbackOptions, Observation
except ImportError:  # pragma: no cover - the `otel` extra is optional
    otel_metrics = None  # type: ignore[assignment]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The `Content-Type` of `Metrics.text()` (Prometheus' text exposition format)."""

_OK = NodeState.OK  # read once: an Enum class attribute is slow to read


class _Cell:
    """A counter's value (an object, so the hot path updates it without re-hashing its labels)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0


class _NodeCells:
    """The series one (flow, node, outcome) updates each time a node settles, found with one lookup."""

    __slots__ = ("outcomes", "duration", "attrs")

    def __init__(self, outcomes: _Cell, duration: _Histogram, attrs: dict[str, str]) -> None:
        self.outcomes, self.duration, self.attrs = outcomes, duration, attrs


class _NodeRow:
    """The series of one (flow, node): those of outcome `ok` at hand (nearly every settlement),
    the others by outcome."""

    __slots__ = ("ok", "others")

    def __init__(self) -> None:
        self.ok: _NodeCells | None = None
        self.others: dict[str, _NodeCells] = {}


class _FlowCells:
    """The series one (flow, status) updates each time a run ends."""

    __slots__ = ("runs", "degraded", "duration", "statements", "round_trips", "attrs", "flow_attrs")

    def __init__(self, runs: _Cell, degraded: _Cell, duration: _Histogram, statements: _Histogram,
                 round_trips: _Histogram, attrs: dict[str, str], flow_attrs: dict[str, str]) -> None:
        self.runs, self.degraded, self.duration = runs, degraded, duration
        self.statements, self.round_trips, self.attrs, self.flow_attrs = statements, round_trips, attrs, flow_attrs


class _SqlCells:
    __slots__ = ("batch", "fused", "attrs")

    def __init__(self, batch: _Histogram, fused: _Histogram, attrs: dict[str, str]) -> None:
        self.batch, self.fused, self.attrs = batch, fused, attrs


class _Histogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[_bisect(self.bounds, value)] += 1  # `le`: value <= bound
        self.sum += value


def _failure(error: BaseException | None) -> str:
    """The `status` of a run that failed because of this node error: a required row that is not
    there (`not_found`, a 404), the database lost (`unavailable`, a 503), else `failed` (a 500)."""
    if isinstance(error, NotFound):
        return "not_found"
    if getattr(error, "database_unavailable", False):
        return "unavailable"
    return "failed"


class Metrics:
    """planner's metrics: a recorder of runs, sources read at collection, and both exposition forms.

    A `Planner` records into the process-wide `default_metrics()` unless given `metrics=`
    (another `Metrics`, or False for none). `meter_provider` is OpenTelemetry's (default: the
    global one, which may be configured later: the API binds its instruments then).
    """

    def __init__(self, *, meter_provider: Any = None, otel: bool = True) -> None:
        self._counters: dict[str, dict[Labels, _Cell]] = {f.name: {} for f in FAMILIES if f.kind == "counter"}
        self._histograms: dict[str, dict[Labels, _Histogram]] = {f.name: {} for f in FAMILIES if f.kind == "histogram"}
        self._rows: dict[str, dict[str, _NodeRow]] = {}  # flow -> node -> its series
        self._sql: dict[tuple[str, str], _SqlCells] = {}
        self._flows: dict[tuple[str, str], _FlowCells] = {}
        self._sources: weakref.WeakKeyDictionary[Any, Callable[[Any], Iterable[Sample]]] = weakref.WeakKeyDictionary()
        self._otel: _Otel | None = None
        # OpenTelemetry: at once with a provider given; with the global one, once an SDK has set
        # it (until then the API would only forward to nothing, at a cost on every node).
        self._otel_pending = otel and otel_metrics is not None
        self._proxy: Any = None  # OpenTelemetry's stand-in provider, while no SDK is set (see `_check_otel`)
        if self._otel_pending and meter_provider is not None:
            self._otel, self._otel_pending = _Otel(self, meter_provider), False

    def _check_otel(self) -> None:
        # Asked at the end of every run until an SDK is there. `get_meter_provider()` reads the
        # environment each time (about 3 us); the API's stand-in (`_ProxyMeterProvider`, private:
        # matched by name, its attribute read with a fallback) is told of the provider set later,
        # so while it has none there is nothing to ask.
        proxy = self._proxy
        if proxy is not None and getattr(proxy, "_real_meter_provider", True) is None:
            return
        provider = otel_metrics.get_meter_provider()
        if type(provider).__name__ == "_ProxyMeterProvider":
            self._proxy = provider
            return
        if isinstance(provider, otel_metrics.NoOpMeterProvider):  # the API's no-op: nothing to record into
            return
        self._otel, self._otel_pending, self._proxy = _Otel(self, provider), False, None

    # --- recording ----------------------------------------------------------------------

    def add(self, name: str, labels: Labels, value: float = 1.0) -> None:
        """Add to counter `name` (labels in the family's order)."""
        series = self._counters[name]
        cell = series.get(labels)
        if cell is None:
            cell = series[labels] = _Cell()
        cell.value += value
        if self._otel is not None:
            self._otel.add(name, labels, value)

    def observe(self, name: str, labels: Labels, value: float) -> None:
        """Record `value` in histogram `name`."""
        self._histogram(name, labels).observe(value)
        if self._otel is not None:
            self._otel.record(name, labels, value)

    def _histogram(self, name: str, labels: Labels) -> _Histogram:
        series = self._histograms[name]
        histogram = series.get(labels)
        if histogram is None:
            histogram = series[labels] = _Histogram(BY_NAME[name].buckets)
        return histogram

    def _node_cells(self, flow: str, node: str, row: _NodeRow, outcome: str) -> _NodeCells:
        labels = (("flow", flow), ("node", node), ("outcome", outcome))
        outcomes = self._counters["planner_node_outcomes_total"].setdefault(labels, _Cell())
        cells = _NodeCells(outcomes, self._histogram("planner_node_duration_seconds", labels), dict(labels))
        if outcome == "ok":
            row.ok = cells
        else:
            row.others[outcome] = cells
        return cells

    def _flow_cells(self, flow: str, status: str) -> _FlowCells:
        labels, by_flow = (("flow", flow), ("status", status)), (("flow", flow),)
        counters = self._counters
        cells = self._flows[flow, status] = _FlowCells(
            counters["planner_flow_runs_total"].setdefault(labels, _Cell()),
            counters["planner_flow_runs_degraded_total"].setdefault(by_flow, _Cell()),
            self._histogram("planner_flow_duration_seconds", labels),
            self._histogram("planner_flow_statements", by_flow),
            self._histogram("planner_flow_round_trips", by_flow), dict(labels), dict(by_flow))
        return cells

    def _sql_cells(self, flow: str, node: str) -> _SqlCells:
        labels = (("flow", flow), ("node", node))
        cells = self._sql[flow, node] = _SqlCells(self._histogram("planner_node_batch_runs", labels),
                                                  self._histogram("planner_node_fused_nodes", labels), dict(labels))
        return cells

    def watch(self, owner: Any, sample: Callable[[Any], Iterable[Sample]]) -> None:
        """Read `sample(owner)` at each collection while `owner` lives (held weakly) and until `unwatch`."""
        self._sources[owner] = sample

    def unwatch(self, owner: Any) -> None:
        self._sources.pop(owner, None)

    def refused(self, flow: str, status: str) -> None:
        """A run refused before any node ran (`unavailable`, `invalid_input`): counted, no latency."""
        self.add("planner_flow_runs_total", (("flow", flow), ("status", status)))

    # --- recording runs (the executor's RunRecorder) ----------------------------------------

    def run_ended(self, ledger: Ledger) -> None:
        """Record a finished run: its status, latency, statements and round trips, and every node it
        settled, in one pass over the run's records (nothing is recorded while the run goes on)."""
        if self._otel_pending:
            self._check_otel()
        flow, otel = ledger.flow.name, self._otel
        rows = self._rows.get(flow) or self._rows.setdefault(flow, {})
        for node, (state, _value, _error, started, finished) in ledger.records.items():
            # One lookup (the node's name, its hash cached) finds every series the node updates.
            # Not the state as a key: hashing a StrEnum member goes through a Python-level slot
            # (about 0.5 us), and `.value` is a slow descriptor; `_value_` is its own attribute.
            row = rows.get(node)
            if row is None:
                row = rows[node] = _NodeRow()
            if state is _OK:
                cells = row.ok or self._node_cells(flow, node, row, "ok")
            else:
                cells = row.others.get(state._value_) or self._node_cells(flow, node, row, state._value_)
            cells.outcomes.value += 1
            if started is not None and finished is not None:  # only a node that ran has a latency
                seconds = (finished - started) / 1000.0
                duration = cells.duration  # `_Histogram.observe`, inlined: this runs for every node
                duration.counts[_bisect(duration.bounds, seconds)] += 1
                duration.sum += seconds
                if otel is not None:
                    otel.node(cells.attrs, seconds)
            elif otel is not None:
                otel.node(cells.attrs, None)
        statements, round_trips = self._sql_nodes(flow, ledger) if ledger.served_args else (0, 0.0)
        status = ledger.status
        if status == "failed" and ledger.failed_node is not None:
            status = _failure(ledger.failed_error())  # as a service answers it: not_found, unavailable, failed
        run = self._flows.get((flow, status)) or self._flow_cells(flow, status)
        degraded = ledger.degraded and status == "ok"
        seconds, trips = ledger.elapsed_ms / 1000.0, round(round_trips)
        run.runs.value += 1
        if degraded:
            run.degraded.value += 1
        run.duration.observe(seconds)
        run.statements.observe(statements)
        run.round_trips.observe(trips)
        if otel is not None:
            otel.runs.add(1, run.attrs)
            otel.run(run, degraded, seconds, statements, trips)

    def _sql_nodes(self, flow: str, ledger: Ledger) -> tuple[int, float]:
        """Record how each SQL node of the run was served; the run's statements and round trips."""
        statements, round_trips = 0, 0.0
        otel = self._otel
        for node, served, attempts in ledger.served():
            if served.cached:  # answered from memory: no statement, no round trip
                continue
            sql = self._sql.get((flow, node)) or self._sql_cells(flow, node)
            sql.batch.observe(served.batch)
            sql.fused.observe(served.fused)
            if otel is not None:
                otel.sql(sql.attrs, served.batch, served.fused)
            sent = served.statements * attempts
            statements += sent
            if served.statements > 1:  # a statement list is a transaction: BEGIN and COMMIT too
                round_trips += sent + 2 * attempts
            else:  # the members of a fused group or a compiled statement share its one round trip
                round_trips += sent / served.run_share
        return statements, round_trips

    # --- collecting ---------------------------------------------------------------------

    def samples(self) -> dict[str, dict[Labels, float]]:
        """The sources' values now, by family, summed over sources with the same labels."""
        out: dict[str, dict[Labels, float]] = {}
        for owner, sample in list(self._sources.items()):
            for name, labels, value in sample(owner):
                series = out.setdefault(name, {})
                series[labels] = series.get(labels, 0.0) + value
        return out

    def value(self, name: str, **labels: str) -> float:
        """A counter's or gauge's value now (0 when never recorded); for tests and quick looks."""
        family = BY_NAME[name]
        key = tuple((label, labels[label]) for label in family.labels)
        if family.kind == "counter" and name in self._counters and key in self._counters[name]:
            return self._counters[name][key].value + self.samples().get(name, {}).get(key, 0.0)
        return self.samples().get(name, {}).get(key, 0.0)

    def histogram(self, name: str, **labels: str) -> tuple[int, float]:
        """A histogram's count and sum (0, 0.0 when never recorded)."""
        family = BY_NAME[name]
        histogram = self._histograms[name].get(tuple((label, labels[label]) for label in family.labels))
        return (0, 0.0) if histogram is None else (sum(histogram.counts), histogram.sum)

    def text(self) -> str:
        """Every metric in Prometheus' text exposition format (serve with `CONTENT_TYPE`)."""
        sampled = self.samples()
        lines: list[str] = []
        for family in FAMILIES:
            lines.append(f"# HELP {family.name} {family.help}")
            lines.append(f"# TYPE {family.name} {family.kind}")
            if family.kind == "histogram":
                for labels, histogram in sorted(self._histograms[family.name].items()):
                    cumulative = 0
                    for bound, count in zip((*family.buckets, math.inf), histogram.counts, strict=True):
                        cumulative += count
                        lines.append(f"{family.name}_bucket{_labels(labels, ('le', _number(bound)))} {cumulative}")
                    lines.append(f"{family.name}_sum{_labels(labels)} {_number(histogram.sum)}")
                    lines.append(f"{family.name}_count{_labels(labels)} {cumulative}")
                continue
            series = {labels: cell.value for labels, cell in self._counters.get(family.name, {}).items()}
            for labels, value in sampled.get(family.name, {}).items():
                series[labels] = series.get(labels, 0.0) + value
            if not series and not family.labels:
                series[()] = 0.0  # an unlabelled family is always shown: 0 is a reading
            for labels, value in sorted(series.items()):
                lines.append(f"{family.name}{_labels(labels)} {_number(value)}")
        return "\n".join(lines) + "\n"


def _labels(labels: Labels, *extra: tuple[str, str]) -> str:
    pairs = (*labels, *extra)
    if not pairs:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in pairs) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class _Otel:
    """The same families as OpenTelemetry instruments: synchronous ones recorded as they happen,
    the sources' values as observable ones read at each export."""

    def __init__(self, metrics: Metrics, provider: Any) -> None:
        meter = (provider or otel_metrics.get_meter_provider()).get_meter("planner")
        self.instruments: dict[str, Any] = {}
        for family in FAMILIES:
            sourced = family.kind == "gauge" or family.name.startswith(("planner_cache_", "planner_call_rejected"))
            if sourced:
                callback = _observe(metrics, family.name)
                make = meter.create_observable_gauge if family.kind == "gauge" else meter.create_observable_counter
                make(family.otel, callbacks=[callback], unit=family.unit, description=family.help)
            elif family.kind == "counter":
                self.instruments[family.name] = meter.create_counter(family.otel, unit=family.unit, description=family.help)
            else:
                self.instruments[family.name] = meter.create_histogram(
                    family.otel, unit=family.unit, description=family.help,
                    explicit_bucket_boundaries_advisory=list(family.buckets))
        instruments = self.instruments
        self.outcomes, self.duration = instruments["planner_node_outcomes_total"], instruments["planner_node_duration_seconds"]
        self.batch, self.fused = instruments["planner_node_batch_runs"], instruments["planner_node_fused_nodes"]
        self.runs, self.degraded = instruments["planner_flow_runs_total"], instruments["planner_flow_runs_degraded_total"]
        self.run_duration, self.statements = instruments["planner_flow_duration_seconds"], instruments["planner_flow_statements"]
        self.round_trips = instruments["planner_flow_round_trips"]

    def add(self, name: str, labels: Labels, value: float) -> None:
        instrument = self.instruments.get(name)
        if instrument is not None:
            instrument.add(value, dict(labels))

    def record(self, name: str, labels: Labels, value: float) -> None:
        self.instruments[name].record(value, dict(labels))

    def run(self, cells: _FlowCells, degraded: bool, seconds: float, statements: int, trips: int) -> None:
        if degraded:
            self.degraded.add(1, cells.flow_attrs)
        self.run_duration.record(seconds, cells.attrs)
        self.statements.record(statements, cells.flow_attrs)
        self.round_trips.record(trips, cells.flow_attrs)

    def node(self, attrs: dict[str, str], seconds: float | None) -> None:
        self.outcomes.add(1, attrs)
        if seconds is not None:
            self.duration.record(seconds, attrs)

    def sql(self, attrs: dict[str, str], batch: int, fused: int) -> None:
        self.batch.record(batch, attrs)
        self.fused.record(fused, attrs)


def _observe(metrics: Metrics, name: str) -> Callable[[Any], Iterable[Any]]:
    def callback(_options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(value, dict(labels)) for labels, value in metrics.samples().get(name, {}).items()]

    return callback


_default: Metrics | None = None


def default_metrics() -> Metrics:
    """The process-wide `Metrics` every Planner records into by default (a Planner whose
    settings say `PLANNER_METRICS=0` records into none)."""
    global _default
    if _default is None:
        _default = Metrics()
    return _default


class Watched(Protocol):
    """What `watch_planner` reads of a Planner: its pools by role, its cache, its sync-call threads."""

    pools: dict[str, Any]
    cache: Any
    threads: CallThreads


def watch_planner(metrics: Metrics, planner: Watched) -> None:
    """Read `planner`'s pools, cache and sync-call threads whenever `metrics` collect (until
    `metrics.unwatch(planner)`), and time how long statements and sync calls wait."""
    metrics.watch(planner, _samples)
    for role, pool in planner.pools.items():
        pool.load.on_wait = _timer(metrics, "planner_pool_wait_seconds", (("pool", role),))
    planner.threads.on_wait = _timer(metrics, "planner_call_wait_seconds", ())


def _samples(planner: Watched) -> list[Sample]:
    out: list[Sample] = []
    for role, pool in planner.pools.items():
        where: Labels = (("pool", role),)
        out.append(("planner_pool_connections", (*where, ("state", "in_use")), pool.load.in_use))
        out.append(("planner_pool_connections", (*where, ("state", "max")), pool.load.max_size))
        out.append(("planner_pool_waiting", where, pool.load.waiting))
    stats = planner.cache.stats(expire=False)  # read from an exporter's thread too: change nothing
    out += [("planner_cache_hits_total", (), stats.hits), ("planner_cache_misses_total", (), stats.misses),
            ("planner_cache_invalidations_total", (), stats.invalidations), ("planner_cache_entries", (), stats.size)]
    threads = planner.threads
    out += [("planner_call_threads", (("state", "busy"),), threads.busy),
            ("planner_call_threads", (("state", "abandoned"),), threads.abandoned),
            ("planner_call_threads", (("state", "max"),), threads.size),
            # Calls waiting for a thread, where the threads queue them (a bounded line before them).
            ("planner_call_threads", (("state", "queued"),), threads.queued),
            ("planner_call_rejected_total", (), threads.rejected)]
    return out


def _timer(metrics: Metrics, name: str, labels: Labels) -> Callable[[float], None]:
    def observe(seconds: float) -> None:
        metrics.observe(name, labels, seconds)

    return observe
