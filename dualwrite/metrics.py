"""Every Prometheus metric dualwrite exports, defined once, with the ``dualwrite_`` prefix.

Label values come only from configuration or from fixed sets written here (mapping names,
operations, outcomes, reasons, classes), never from client input, so the number of series is
bounded however many clients, users or databases connect.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from dualwrite import __version__

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


class HotCounters(Collector):
    """Counters bumped on the relay's hot path, kept as plain ints and exported at scrape time.

    prometheus-client counters take a lock on every increment; the relay bumps these once per
    socket read, from the event-loop thread only, which is also where /metrics is served.
    """

    def __init__(self) -> None:
        self.bytes_client_to_upstream = 0
        self.bytes_upstream_to_client = 0
        self.statements = {"read": 0, "write": 0, "other": 0}

    def collect(self) -> Iterator[CounterMetricFamily]:
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
    "CPU time the proxy spends handling one read from a socket (sampled 1 in 256)",
    ["direction"],
    buckets=(1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2),
)

# --- mirroring ---------------------------------------------------------------------------------

STATEMENTS_REWRITTEN: Final = Counter(
    "dualwrite_statements_rewritten_total",
    "Application writes rewritten to mirror into the new schema",
    ["mapping", "operation"],
)
ROWS_MIRRORED: Final = Counter(
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
REWRITE_CACHE: Final = Counter(
    "dualwrite_rewrite_cache_total",
    "Statement analyses answered from the shape cache or computed",
    ["result"],  # hit, miss
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
