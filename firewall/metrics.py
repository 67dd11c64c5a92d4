"""The Prometheus endpoint of ``nfgate run`` (``[metrics]``): what its processes count, as series.

``nfgate run`` serves ``/metrics`` over HTTP on ``metrics.listen`` (a local
address by default; the endpoint has no authentication) with prometheus-client,
from a thread of its own, so a slow scrape never stalls the supervisor's loop.
Each scrape asks every running processor and gateway for its counters over
its root-only control socket (``{"cmd": "stats"}``: firewall/control.py),
at most ``PROCESS_TIMEOUT`` seconds each, and the supervisor for its
processes' state and restarts.

Totals outlive the processes. A processor or gateway counts from zero when
it is restarted, so ``Totals`` keeps, per process name, what its earlier
instances had counted when last read, and exports that plus what the live
instance counts: a ``_total`` series never goes down while ``nfgate run``
runs. A poller thread reads every process each ``metrics.poll`` seconds, so
what a crash loses is at most the counts of its last ``poll`` seconds.

The series (labels in braces):

- ``nfgate_process_up{process,kind}``, ``nfgate_process_restarts_total``,
  ``nfgate_process_stats_ok`` (1 when the last read of its counters worked);
- ``nfgate_processor_events_total{processor,counter}``: every counter of
  ``nfgate status`` (``queued``, ``verdict.*``, ``drop.*``, ``flows.*``,
  ``signalling.*``, ``rules.*``, ``conntrack.*``, ``control.*``,
  ``queue.overflow`` and the kernel's ``queue.kernel.dropped_*``);
- ``nfgate_processor_queue_overflow_total{processor}``: packets lost at the
  queue (the kernel's full queue and full socket buffer, and the overflows
  the processor saw); ``nfgate_processor_queue_waiting``;
- ``nfgate_processor_flows``, ``nfgate_processor_logged_flows``,
  ``nfgate_processor_rules`` and ``nfgate_bindings{processor,gateway}``;
- ``nfgate_pool_used{processor,pool,address}``, ``nfgate_pool_capacity``,
  ``nfgate_pool_exhausted_total``;
- ``nfgate_gateway_events_total{gateway,counter}``: the gateway's ``stats``
  line (``layer.*``: signalling and lookups; ``relay.*``: connections, bytes,
  refusals, by kind), ``nfgate_gateway_active_connections``,
  ``nfgate_gateway_buffered_bytes``;
- with ``[ha]`` (docs/ha.md): ``nfgate_ha_state{node,state}`` (1 for the
  node's VRRP state: primary, backup, fault or unknown),
  ``nfgate_ha_transitions_total{node}``,
  ``nfgate_ha_last_failover_timestamp_seconds{node}`` (when it last became
  primary), ``nfgate_ha_sync_up{node}`` (1 when conntrackd answers),
  ``nfgate_ha_sync_entries{node}`` and
  ``nfgate_ha_sync_total{node,counter}`` (conntrackd's ``injected``,
  ``inject_failed``, ``packets_sent``, ``packets_recv``, ``bytes_sent``,
  ``bytes_recv``, ``errors_send``, ``errors_recv``, ``lost``).
"""

from __future__ import annotations

import ipaddress
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector, CollectorRegistry

from firewall.control import ControlError, ask

PROCESS_TIMEOUT = 1.0  # seconds a process's control socket gets to answer a read
GAUGES = frozenset({"queue.kernel.waiting"})  # processor "counters" that go up and down
OVERFLOW = ("queue.overflow", "queue.kernel.dropped_full", "queue.kernel.dropped_buffer")


@dataclass(frozen=True)
class Process:
    """What the supervisor says of one child at a scrape."""

    name: str
    kind: str  # "processor" or "gateway"
    pid: int | None  # None when not running
    restarts: int
    control: Path | None  # its stats socket; None for a kind that has none


def parse_listen(text: str) -> tuple[str, int] | None:
    """``metrics.listen`` as (address, port); None for ""."""
    if not text:
        return None
    host, _, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") else host
    return str(ipaddress.ip_address(host)), int(port)


class Totals:
    """Counters per process name that survive its restarts (module docstring)."""

    def __init__(self) -> None:
        self._base: dict[str, Counter[str]] = {}
        self._last: dict[str, tuple[int, dict[str, int]]] = {}

    def observe(self, name: str, pid: int, counters: dict[str, int]) -> dict[str, int]:
        """The totals of ``name`` given what its instance ``pid`` counts now."""
        base = self._base.setdefault(name, Counter())
        last = self._last.get(name)
        # Another pid, or a counter that went down (the same pid reused): a new instance.
        if last is not None and (last[0] != pid or any(k in counters and counters[k] < v for k, v in last[1].items())):
            base.update(last[1])
        elif last is not None:
            # The same instance: a counter it did not report this time (the kernel's
            # queue line, unreadable for a moment) keeps its last value.
            counters = {**last[1], **counters}
        self._last[name] = (pid, dict(counters))
        return {k: base.get(k, 0) + counters.get(k, 0) for k in base.keys() | counters.keys()}

    def carried(self, name: str) -> dict[str, int]:
        """The totals of ``name`` while no instance of it answers: all it counted."""
        out = Counter(self._base.get(name, Counter()))
        last = self._last.get(name)
        if last is not None:
            out.update(last[1])
        return dict(out)


def _flat(prefix: str, values: Any) -> dict[str, int]:
    if not isinstance(values, dict):
        return {}
    return {f"{prefix}{k}": v for k, v in values.items() if isinstance(v, int) and not isinstance(v, bool)}


class Metrics(Collector):
    """The collector behind ``/metrics``, and its poller (module docstring)."""

    def __init__(self, processes: Callable[[], list[Process]], poll: float,
                 ha: Callable[[], dict[str, Any] | None] | None = None) -> None:
        self._processes = processes
        self._ha = ha
        self._poll = poll
        # One read at a time (the poller's, a scrape's): the totals must see each
        # process's answers in the order they were given.
        self._reading = threading.Lock()
        self._totals = Totals()
        self._stop = threading.Event()
        self._server: Any = None
        self._threads: list[threading.Thread] = []

    # ---- reading the processes --------------------------------------------------------

    def read(self) -> list[tuple[Process, dict[str, Any] | None, dict[str, int]]]:
        """Each process with its stats (None when it did not answer) and its counter totals."""
        with self._reading:
            return self._read()

    def _read(self) -> list[tuple[Process, dict[str, Any] | None, dict[str, int]]]:
        out = []
        for proc in self._processes():
            stats: dict[str, Any] | None = None
            if proc.pid is not None and proc.control is not None:
                try:
                    answer = ask(proc.control, {"cmd": "stats"}, PROCESS_TIMEOUT)
                    stats = answer if isinstance(answer, dict) else None
                except (ControlError, OSError, ValueError):
                    stats = None
            if stats is not None and proc.pid is not None:
                totals = self._totals.observe(proc.name, proc.pid, self._counters(proc, stats))
            else:
                totals = self._totals.carried(proc.name)
            out.append((proc, stats, totals))
        return out

    @staticmethod
    def _counters(proc: Process, stats: dict[str, Any]) -> dict[str, int]:
        if proc.kind == "processor":
            counters = _flat("", stats.get("counters"))
            for gauge in GAUGES:
                counters.pop(gauge, None)
            for address, pool in (("", (stats.get("pools") or {}).get("firewall_side")),
                                  *((a, p) for a, p in ((stats.get("pools") or {}).get("snat") or {}).items())):
                if isinstance(pool, dict) and isinstance(pool.get("exhausted"), int):
                    counters[f"pool|{'snat' if address else 'firewall_side'}|{address}"] = pool["exhausted"]
            return counters
        return {**_flat("layer.", stats.get("layer")), **_flat("relay.", stats.get("relay"))}

    # ---- the exposition ---------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("nfgate_process_up", "1 while the process runs", labels=["process", "kind"])
        restarts = CounterMetricFamily("nfgate_process_restarts", "times the supervisor restarted it",
                                       labels=["process", "kind"])
        ok = GaugeMetricFamily("nfgate_process_stats_ok", "1 when its counters could be read at this scrape",
                               labels=["process", "kind"])
        p_events = CounterMetricFamily("nfgate_processor_events", "the processor's counters (nfgate status), "
                                       "totals across its restarts", labels=["processor", "counter"])
        overflow = CounterMetricFamily("nfgate_processor_queue_overflow", "packets lost at its NFQUEUE "
                                       "(queue full, socket buffer full)", labels=["processor"])
        waiting = GaugeMetricFamily("nfgate_processor_queue_waiting", "packets waiting in its NFQUEUE", labels=["processor"])
        flows = GaugeMetricFamily("nfgate_processor_flows", "live bindings", labels=["processor"])
        logged = GaugeMetricFamily("nfgate_processor_logged_flows", "live log-only flows", labels=["processor"])
        rules = GaugeMetricFamily("nfgate_processor_rules", "live dynamic rules", labels=["processor"])
        bindings = GaugeMetricFamily("nfgate_bindings", "live bindings per gateway", labels=["processor", "gateway"])
        pool_used = GaugeMetricFamily("nfgate_pool_used", "endpoints in use", labels=["processor", "pool", "address"])
        pool_cap = GaugeMetricFamily("nfgate_pool_capacity", "endpoints in the pool", labels=["processor", "pool", "address"])
        pool_ex = CounterMetricFamily("nfgate_pool_exhausted", "times a flow found the pool empty",
                                      labels=["processor", "pool", "address"])
        g_events = CounterMetricFamily("nfgate_gateway_events", "the gateway's counters (its stats line), "
                                       "totals across its restarts", labels=["gateway", "counter"])
        active = GaugeMetricFamily("nfgate_gateway_active_connections", "connections it relays now", labels=["gateway"])
        buffered = GaugeMetricFamily("nfgate_gateway_buffered_bytes", "bytes its relays hold now", labels=["gateway"])
        for proc, stats, totals in self.read():
            labels = [proc.name, proc.kind]
            up.add_metric(labels, 1 if proc.pid is not None else 0)
            restarts.add_metric(labels, proc.restarts)
            if proc.control is not None:
                ok.add_metric(labels, 1 if stats is not None else 0)
            if proc.kind == "processor":
                for key, value in sorted(totals.items()):
                    if key.startswith("pool|"):
                        _, pool, address = key.split("|", 2)
                        pool_ex.add_metric([proc.name, pool, address], value)
                    else:
                        p_events.add_metric([proc.name, key], value)
                overflow.add_metric([proc.name], sum(totals.get(k, 0) for k in OVERFLOW))
                if stats is not None:
                    self._processor_gauges(proc.name, stats, waiting, flows, logged, rules, bindings, pool_used, pool_cap)
            elif proc.kind == "gateway":
                for key, value in sorted(totals.items()):
                    g_events.add_metric([proc.name.removeprefix("gateway-"), key], value)
                if stats is not None:
                    gw = proc.name.removeprefix("gateway-")
                    active.add_metric([gw], stats.get("active", 0))
                    if isinstance(stats.get("buffered"), int):
                        buffered.add_metric([gw], stats["buffered"])
        yield from (up, restarts, ok, p_events, overflow, waiting, flows, logged, rules, bindings,
                    pool_used, pool_cap, pool_ex, g_events, active, buffered)
        if self._ha is not None:
            yield from ha_metrics(self._ha())

    @staticmethod
    def _processor_gauges(name: str, stats: dict[str, Any], waiting: GaugeMetricFamily, flows: GaugeMetricFamily,
                          logged: GaugeMetricFamily, rules: GaugeMetricFamily, bindings: GaugeMetricFamily,
                          pool_used: GaugeMetricFamily, pool_cap: GaugeMetricFamily) -> None:
        counters = stats.get("counters") or {}
        if "queue.kernel.waiting" in counters:
            waiting.add_metric([name], counters["queue.kernel.waiting"])
        flows.add_metric([name], stats.get("flows", 0))
        logged.add_metric([name], stats.get("logged_flows", 0))
        rules.add_metric([name], stats.get("rules", 0))
        for gateway, n in sorted((stats.get("flows_per_gateway") or {}).items()):
            bindings.add_metric([name, gateway], n)
        pools = stats.get("pools") or {}
        each = [("firewall_side", "", pools.get("firewall_side"))]
        each += [("snat", address, pool) for address, pool in sorted((pools.get("snat") or {}).items())]
        for pool, address, values in each:
            if isinstance(values, dict):
                pool_used.add_metric([name, pool, address], values.get("used", 0))
                pool_cap.add_metric([name, pool, address], values.get("capacity", 0))

    # ---- serving ----------------------------------------------------------------------

    def start(self, listen: tuple[str, int]) -> None:
        """Serve ``/metrics`` on ``listen`` and start the poller. OSError if the address is taken."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        self._server, thread = start_http_server(listen[1], listen[0], registry=registry)
        poller = threading.Thread(target=self._run_poller, name="nfgate-metrics-poll", daemon=True)
        poller.start()
        self._threads = [thread, poller]

    def _run_poller(self) -> None:
        while not self._stop.wait(self._poll):
            self.read()

    def close(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for thread in self._threads:
            thread.join(timeout=PROCESS_TIMEOUT * 4)
        self._threads = []


HA_STATES = ("primary", "backup", "fault", "unknown")
HA_SYNC_COUNTERS = ("injected", "inject_failed", "packets_sent", "packets_recv", "bytes_sent", "bytes_recv",
                    "errors_send", "errors_recv", "lost")


def ha_metrics(status: dict[str, Any] | None) -> list[Metric]:
    """The pair's series from ``firewall.ha.node_status`` (module docstring); none without [ha]."""
    if status is None:
        return []
    node = status["node"]
    state = GaugeMetricFamily("nfgate_ha_state", "1 for the node's VRRP state", labels=["node", "state"])
    for name in HA_STATES:
        state.add_metric([node, name], 1 if status.get("vrrp", "unknown") == name else 0)
    transitions = CounterMetricFamily("nfgate_ha_transitions", "VRRP state changes the notify script recorded",
                                      labels=["node"])
    transitions.add_metric([node], status.get("transitions", 0))
    last = GaugeMetricFamily("nfgate_ha_last_failover_timestamp_seconds", "when the node last became primary",
                             labels=["node"])
    if status.get("last_failover") is not None:
        last.add_metric([node], status["last_failover"])
    sync = status.get("sync") or {}
    up = GaugeMetricFamily("nfgate_ha_sync_up", "1 when conntrackd answers", labels=["node"])
    up.add_metric([node], 1 if sync.get("running") else 0)
    entries = GaugeMetricFamily("nfgate_ha_sync_entries", "entries in conntrackd's internal cache", labels=["node"])
    counters = CounterMetricFamily("nfgate_ha_sync", "conntrackd's counters", labels=["node", "counter"])
    if "entries" in sync:
        entries.add_metric([node], sync["entries"])
    for key in HA_SYNC_COUNTERS:
        if key in sync:
            counters.add_metric([node, key], sync[key])
    return [state, transitions, last, up, entries, counters]
