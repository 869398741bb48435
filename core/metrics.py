"""Every Prometheus metric dualwrite exports, defined once, with the ``dualwrite_`` prefix.

Label values come only from configuration or from fixed sets written here (mapping names,
operations, outcomes, reasons, classes), never from client input, so the number of series is
bounded however many clients, users or databases connect.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any, Final

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from core import __version__

# The *_created series double the output and no dashboard here uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

BUILD: Final = Info("dualwrite_build", "Version of the running dualwrite")
BUILD.info({"version": __version__})

# --- proxy: connections and traffic ----------------------------------------------------------

CLIENT_CONNECTIONS: Final = Gauge(
    "dualwrite_client_connections_open", "Client connections currently open through the proxy"
)
CLIENT_CONNECTIONS_TOTAL: Final = Counter(
    "dualwrite_client_connections_accepted_total", "Client connections accepted by the proxy"
)
#: reasons: max_connections, startup_timeout, protocol_error, shutting_down, upstream_unavailable
CLIENT_CONNECTIONS_REJECTED: Final = Counter(
    "dualwrite_client_connections_rejected_total",
    "Client connections refused or closed by the proxy before or during startup",
    ["reason"],
)
PROTOCOL_ERRORS: Final = Counter(
    "dualwrite_protocol_errors_total",
    "Client connections closed for a protocol violation",
    ["kind"],  # too_large, malformed, unexpected
)


#: what one shadow read can come to (dualwrite_shadow_statements_total's outcome label)
SHADOW_OUTCOMES: Final = ("match", "mismatch", "noise", "error", "unsafe", "dropped")


class HotCounters(Collector):
    """Counters bumped on the relay's hot path, kept as plain ints and exported at scrape time.

    prometheus-client counters take a lock on every increment; the relay bumps these once per
    socket read, from the event-loop thread only, which is also where /metrics is served.

    Sessions relayed by the native loop (proxy/native.py) count in C; each is a *live source*
    whose counts are added here in batches: when its loop hands back to Python, and at every
    scrape (``publish()`` of each source in ``live``), so a scrape sees them as they are.
    """

    def __init__(self) -> None:
        #: objects with a ``publish()`` that adds what they counted since the last call
        self.live: weakref.WeakSet[Any] = weakref.WeakSet()
        self.bytes_client_to_upstream = 0
        self.bytes_upstream_to_client = 0
        self.statements = {"read": 0, "write": 0, "other": 0}
        self.rewrite_cache = {"hit": 0, "miss": 0}
        #: statement texts the traffic recorder saw: a repeat (cached), queued for analysis,
        #: or dropped because the queue was full (the evidence then has a gap)
        self.traffic_statements = {"cached": 0, "queued": 0, "dropped": 0}
        #: shadow reads by outcome; "dropped" is bumped on the relay path (queue full)
        self.shadow_statements = dict.fromkeys(SHADOW_OUTCOMES, 0)

    def collect(self) -> Iterator[CounterMetricFamily]:
        for source in list(self.live):
            source.publish()
        traffic = CounterMetricFamily(
            "dualwrite_proxy_bytes",
            "Bytes relayed by the proxy, by direction",
            labels=["direction"],
        )
        traffic.add_metric(["client_to_upstream"], self.bytes_client_to_upstream)
        traffic.add_metric(["upstream_to_client"], self.bytes_upstream_to_client)
        yield traffic
        statements = CounterMetricFamily(
            "dualwrite_statements",
            "Statements the proxy relayed, by kind (read, write, other)",
            labels=["kind"],
        )
        for kind, count in self.statements.items():
            statements.add_metric([kind], count)
        yield statements
        cache = CounterMetricFamily(
            "dualwrite_rewrite_cache",
            "Statement analyses answered from the shape cache or computed",
            labels=["result"],
        )
        for result, count in self.rewrite_cache.items():
            cache.add_metric([result], count)
        yield cache
        recorded = CounterMetricFamily(
            "dualwrite_traffic_statements",
            "Statement texts the traffic recorder saw: repeats, queued for analysis, dropped",
            labels=["result"],
        )
        for result, count in self.traffic_statements.items():
            recorded.add_metric([result], count)
        yield recorded
        shadow = CounterMetricFamily(
            "dualwrite_shadow_statements",
            "Shadow reads by outcome: match, mismatch, noise (the A/A pair differed), error, "
            "unsafe (refused by the read-only replay), dropped (the shadow queue was full)",
            labels=["outcome"],
        )
        for outcome, count in self.shadow_statements.items():
            shadow.add_metric([outcome], count)
        yield shadow


class _HotChild:
    """One series of a :class:`HotCounter`."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class HotCounter(Collector):
    """A labelled counter bumped once or more per mirrored statement: ``labels(...).inc()``
    as on a prometheus-client Counter, but a plain float without a lock (the same event-loop
    thread bumps it and serves /metrics, as for :class:`HotCounters`)."""

    def __init__(self, name: str, documentation: str, labelnames: list[str]) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = labelnames
        self._children: dict[tuple[str, ...], _HotChild] = {}
        REGISTRY.register(self)

    def labels(self, *values: str) -> _HotChild:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = _HotChild()
        return child

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value)
        yield family


_CHILDREN: dict[tuple[int, tuple[str, ...]], Any] = {}


def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, looked up once: labels() takes a lock on every call."""
    key = (id(metric), labels)
    found = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN[key] = metric.labels(*labels)
    return found


HOT: Final = HotCounters()
REGISTRY.register(HOT)
UPSTREAM_CONNECT_ERRORS: Final = Counter(
    "dualwrite_upstream_connect_errors_total",
    "Failed attempts to open a connection to the upstream PostgreSQL server",
)
CANCEL_REQUESTS: Final = Counter(
    "dualwrite_cancel_requests_total",
    "CancelRequests received, by outcome (forwarded, unknown_key, failed)",
    ["outcome"],
)
PROXY_PROCESSING_SECONDS: Final = Histogram(
    "dualwrite_proxy_processing_seconds",
    "CPU time the Python relay spends handling one read from a socket (sampled 1 in 256; "
    "reads relayed by the native loop are not timed)",
    ["direction"],
    buckets=(1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2),
)

# --- mirroring ---------------------------------------------------------------------------------

STATEMENTS_REWRITTEN: Final = HotCounter(
    "dualwrite_statements_rewritten_total",
    "Application writes rewritten to mirror into the new schema",
    ["mapping", "operation"],
)
ROWS_MIRRORED: Final = HotCounter(
    "dualwrite_rows_mirrored_total",
    "Source rows captured by rewritten statements (written to the target in sync mode, "
    "queued in the outbox otherwise)",
    ["mapping", "operation"],
)
MIRROR_FAILURES: Final = Counter(
    "dualwrite_mirror_failures_total",
    "Rewritten statements that failed, and applier batches that failed",
    ["mapping", "stage"],  # stage: statement, applier
)
UNMIRRORED_STATEMENTS: Final = Counter(
    "dualwrite_unmirrored_statements_total",
    "Writes to a mapped table forwarded without a mirror (policy passthrough)",
    ["mapping", "reason"],
)
REJECTED_STATEMENTS: Final = Counter(
    "dualwrite_rejected_statements_total",
    "Writes to a mapped table refused (policy reject)",
    ["mapping", "reason"],
)
PREPARED_WRITES: Final = HotCounter(
    "dualwrite_prepared_writes_total",
    "Simple-protocol writes to mapped tables and the server-side prepared statements made for "
    "their shapes, by outcome: prepared, parse_failed, executed, unprepared (ran as a simple "
    "Query), evicted, invalidated",
    ["outcome"],
)
MAPPING_PAUSED: Final = Gauge(
    "dualwrite_mapping_paused", "1 while a mapping is paused, else 0", ["mapping"]
)

# --- outbox and applier ------------------------------------------------------------------------

OUTBOX_DEPTH: Final = Gauge("dualwrite_outbox_depth", "Keys waiting in the outbox", ["mapping"])
OUTBOX_OLDEST_AGE: Final = Gauge(
    "dualwrite_outbox_oldest_age_seconds",
    "Age of the oldest key waiting in the outbox",
    ["mapping"],
)
APPLIER_BATCH_SECONDS: Final = Histogram(
    "dualwrite_applier_batch_seconds",
    "Time to claim and apply one outbox batch",
    ["mapping"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)
APPLIER_ROWS: Final = Counter(
    "dualwrite_applier_rows_total",
    "Target rows written by sync_keys (applier, repair, backfill), by outcome",
    ["mapping", "outcome"],  # upserted, deleted, unchanged
)
DEAD_LETTERS: Final = Gauge(
    "dualwrite_dead_letters", "Keys currently in the dead-letter table", ["mapping"]
)
DEAD_LETTERED_TOTAL: Final = Counter(
    "dualwrite_dead_lettered_total", "Keys moved to the dead-letter table", ["mapping"]
)

# --- WAL capture (mirror/wal/) ------------------------------------------------------------------

WAL_CHANGES: Final = Counter(
    "dualwrite_wal_changes_total",
    "Committed source row changes the WAL reader decoded, by mapping and operation",
    ["mapping", "operation"],  # insert, update, delete
)
WAL_KEYS_QUEUED: Final = Counter(
    "dualwrite_wal_keys_queued_total",
    "Keys the WAL reader queued in the outbox (distinct per poll)",
    ["mapping"],
)
UNCAPTURED_CHANGES: Final = Counter(
    "dualwrite_uncaptured_changes_total",
    "capture: both. Committed changes statement capture did not record (found in the WAL, "
    "recorded in dualwrite.uncaptured_changes and queued)",
    ["mapping"],
)
WAL_TRUNCATES: Final = Counter(
    "dualwrite_wal_truncates_total",
    "TRUNCATEs of a WAL-read source: each marks the mapping for a full resync",
    ["mapping"],
)
RESYNC_NEEDED: Final = Gauge(
    "dualwrite_resync_needed",
    "1 while a mapping is marked for a full resync (dualwrite.resync_needed), else 0",
    ["mapping"],
)
WAL_SLOT_RETAINED_BYTES: Final = Gauge(
    "dualwrite_wal_slot_retained_bytes",
    "WAL the reader's replication slot holds back on the server (current LSN - restart_lsn)",
    ["slot"],
)
WAL_OLDEST_UNCONFIRMED_AGE: Final = Gauge(
    "dualwrite_wal_oldest_unconfirmed_age_seconds",
    "Age of the oldest committed change the reader had decoded but not yet confirmed, at its "
    "last poll (0 when it is caught up)",
    ["slot"],
)
WAL_READER_LEADER: Final = Gauge(
    "dualwrite_wal_reader_leader",
    "1 while this process is the WAL reader of the slot (the others stand by), else 0",
    ["slot"],
)
WAL_SLOT_DROPPED: Final = Counter(
    "dualwrite_wal_slot_dropped_total",
    "Replication slots dropped because they retained more than wal.max_retained_bytes",
    ["slot"],
)
WAL_POLL_SECONDS: Final = Histogram(
    "dualwrite_wal_poll_seconds",
    "Time of one WAL reader poll: decode, derive keys, queue, confirm",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)

# --- admin -------------------------------------------------------------------------------------

ADMIN_ACTIONS: Final = Counter(
    "dualwrite_admin_actions_total",
    "Admin API action attempts, by action (route's last segment) and outcome "
    "(ok, accepted, unauthorized, bad_request, not_found, conflict, failed)",
    ["action", "outcome"],
)
ADMIN_AUDIT_FAILURES: Final = Counter(
    "dualwrite_admin_audit_failures_total",
    "Admin action attempts that could not be written to dualwrite.admin_actions",
)

# Read from the control schema by the sidecar before each scrape, so they hold whichever
# process ran the pass or backfill (``dualwrite reconcile`` from a cron job, another pod).
LAST_PASS_DIVERGENT_ROWS: Final = Gauge(
    "dualwrite_last_pass_divergent_rows",
    "Divergent rows found by the mapping's most recent finished full reconcile pass, by class "
    "(missing, extra, changed)",
    ["mapping", "class"],
)
LAST_PASS_TIMESTAMP: Final = Gauge(
    "dualwrite_last_pass_timestamp_seconds",
    "When the mapping's most recent finished full reconcile pass ended (unix time; 0: never)",
    ["mapping"],
)
LAST_CLEAN_PASS_TIMESTAMP: Final = Gauge(
    "dualwrite_last_clean_pass_timestamp_seconds",
    "When the mapping's most recent clean full reconcile pass ended (unix time; 0: never)",
    ["mapping"],
)
BACKFILL_ROWS_DONE: Final = Gauge(
    "dualwrite_backfill_rows_done", "Rows the mapping's backfill has copied", ["mapping"]
)
BACKFILL_ROWS_ESTIMATE: Final = Gauge(
    "dualwrite_backfill_rows_estimate",
    "Source rows the mapping's backfill expects to copy (0: unknown)",
    ["mapping"],
)
BACKFILL_COMPLETE: Final = Gauge(
    "dualwrite_backfill_complete", "1 once the mapping's backfill is done, else 0", ["mapping"]
)

#: counters summed per mapping for /status ("since this process started")
_SINCE_START: Final = {
    "statements_rewritten": STATEMENTS_REWRITTEN,
    "rows_mirrored": ROWS_MIRRORED,
    "mirror_failures": MIRROR_FAILURES,
    "unmirrored_statements": UNMIRRORED_STATEMENTS,
    "rejected_statements": REJECTED_STATEMENTS,
    "dead_lettered": DEAD_LETTERED_TOTAL,
}


def counts_since_start() -> dict[str, dict[str, float]]:
    """Per mapping, the mirroring counters of this process summed over their other labels."""
    totals: dict[str, dict[str, float]] = {}
    for name, counter in _SINCE_START.items():
        for family in counter.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    per_mapping = totals.setdefault(sample.labels["mapping"], {})
                    per_mapping[name] = per_mapping.get(name, 0.0) + sample.value
    return totals

# --- reconciler and backfill -------------------------------------------------------------------
# Set by the process that runs the pass or backfill (``dualwrite reconcile`` / ``backfill``, or
# the continuous pass inside ``dualwrite run``). The last-pass and last-clean-pass gauges above
# are also set by that process at the end of a full pass.

RECONCILE_ROWS_COMPARED: Final = Counter(
    "dualwrite_reconcile_rows_compared_total",
    "Keys the reconciler compared between source and target",
    ["mapping"],
)
RECONCILE_PENDING_KEYS: Final = Gauge(
    "dualwrite_reconcile_pending_keys",
    "Keys that differed in the last pass but were waiting in the outbox or dead letters",
    ["mapping"],
)
RECONCILE_PASS_SECONDS: Final = Histogram(
    "dualwrite_reconcile_pass_duration_seconds",
    "Wall time of one reconcile pass over a mapping (throttling and re-check delays included)",
    ["mapping"],
    buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, 7200, 21600),
)
RECONCILE_PASSES: Final = Counter(
    "dualwrite_reconcile_passes_total",
    "Reconcile passes finished, by outcome (clean, divergent, failed, interrupted)",
    ["mapping", "outcome"],
)
RECONCILE_REPAIRED_ROWS: Final = Counter(
    "dualwrite_reconcile_repaired_rows_total",
    "Target rows written by repair, by outcome (upserted, deleted)",
    ["mapping", "outcome"],
)
THROTTLE_PAUSED_SECONDS: Final = Counter(
    "dualwrite_reconcile_throttle_paused_seconds_total",
    "Time the reconciler or backfill spent paused because the database was under pressure",
    ["mapping"],
)
BACKFILL_ROWS_COPIED: Final = Counter(
    "dualwrite_backfill_rows_copied_total",
    "Source keys the backfill has passed to sync_keys in this process",
    ["mapping"],
)
BACKFILL_PROGRESS: Final = Gauge(
    "dualwrite_backfill_progress_ratio",
    "Backfill progress of the running process: rows done over the estimate (1 when done)",
    ["mapping"],
)


# --- shadow reads ------------------------------------------------------------------------------

SHADOW_LATENCY_RATIO: Final = Histogram(
    "dualwrite_shadow_latency_ratio",
    "Replayed read latency, new (view or other server) over old (the original statement)",
    buckets=(0.25, 0.5, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0),
)
SHADOW_QUEUE_DEPTH: Final = Gauge(
    "dualwrite_shadow_queue_depth", "Captured reads waiting for a shadow replay"
)
SHADOW_WORKER_RESTARTS: Final = Counter(
    "dualwrite_shadow_worker_restarts_total",
    "Times the shadow's worker process died (killed, out of memory, a bug) and was started "
    "again; the application's statements are not affected, queued captures are lost",
)

# --- business invariants ------------------------------------------------------------------------
# Labelled by invariant name only (names come from the config, so the series are bounded by it).
# Set by the process that checks them (``dualwrite reconcile``) and, from the control schema,
# by the sidecar before each scrape, like the last-pass gauges.

INVARIANT_FAILING_GROUPS: Final = Gauge(
    "dualwrite_invariant_failing_groups",
    "Groups (e.g. tenant and day) that broke the invariant in its most recent full check",
    ["invariant"],
)
INVARIANT_LAST_CHECK_TIMESTAMP: Final = Gauge(
    "dualwrite_invariant_last_check_timestamp_seconds",
    "When the invariant's most recent full check finished (unix time; 0: never)",
    ["invariant"],
)
#: outcomes: held, broken, failed (the check itself could not run to the end)
INVARIANT_CHECKS: Final = Counter(
    "dualwrite_invariant_checks_total",
    "Invariant checks run by this process, by outcome (held, broken, failed)",
    ["invariant", "outcome"],
)

#: metric families deliberately not on config/grafana-dashboard.json, each with its reason
#: (tests/test_observability_rules.py checks every other family is charted)
NOT_CHARTED: Final[dict[str, str]] = {}

# --- tenants -------------------------------------------------------------------------------------
# Set by the sidecar before each scrape from the control schema (mappings with a tenant_column).
# Tenant ids come from the data, so they are never a free label: the count by verdict has two
# series, and only the WORST_TENANTS_MAX tenants with the most open trouble are exported by
# name (the series of a tenant that leaves the top are removed), so at most that many exist.

#: tenants exported by name in dualwrite_worst_tenant_trouble (a capped label set)
WORST_TENANTS_MAX: Final = 5
TENANTS: Final = Gauge(
    "dualwrite_tenants",
    "Tenants by verdict of their open trouble: no_go when the latest full pass found divergent "
    "rows of the tenant, it has dead letters, failing invariant groups or mismatched shadow "
    "reads; go for every other tenant the report judges (report.tenants, cutover.tenants, "
    "tenants named by the passes it reads); the cutover report also judges each tenant's "
    "clean window",
    ["verdict"],
)
WORST_TENANT_TROUBLE: Final = Gauge(
    "dualwrite_worst_tenant_trouble",
    "Divergent rows + dead letters + failing invariant groups + mismatched shadow reads of the "
    "tenants with the most "
    "(at most WORST_TENANTS_MAX = 5 tenants, worst first)",
    ["tenant"],
)
