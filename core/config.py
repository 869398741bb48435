"""Every configuration model of dualwrite, and the loader that validates a YAML file into them.

Unknown keys are rejected with their path; values are checked at load; secrets never live in
the file: the service password comes from the environment (``PGPASSWORD`` or a password in
``DUALWRITE_SERVICE_DSN``) and the admin token from the variable named by ``admin.token_env``.
"""

from __future__ import annotations

import difflib
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from core.connect import check_dsn
from core.errors import ConfigError, ConfigErrors
from core.modes import Capture, MirrorMode, capture_problem
from core.sqltext import check_select

SERVICE_DSN_ENV = "DUALWRITE_SERVICE_DSN"
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_RULE_ID = re.compile(r"^[a-z][a-z0-9-]{1,80}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)?\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}

Port = Annotated[int, Field(ge=1, le=65535)]
PositiveSeconds = Annotated[float, Field(gt=0)]


class Strict(BaseModel):
    """Base for config models: unknown keys are errors, values are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class ListenConfig(Strict):
    host: str = "127.0.0.1"
    #: 0 binds a free port (tests); the bound port is logged
    port: Annotated[int, Field(ge=0, le=65535)] = 6432


class UpstreamTLSConfig(Strict):
    """TLS from the sidecar to PostgreSQL (clients talk to the sidecar in plain text)."""

    mode: Literal["disable", "prefer", "require", "verify-ca", "verify-full"] = "disable"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    @model_validator(mode="after")
    def _verify_needs_ca(self) -> UpstreamTLSConfig:
        if self.mode in ("verify-ca", "verify-full") and self.ca_file is None:
            raise ValueError(f"mode {self.mode} needs ca_file")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class UpstreamConfig(Strict):
    host: str = "127.0.0.1"
    port: Port = 5432
    connect_timeout_seconds: PositiveSeconds = 5.0
    tls: UpstreamTLSConfig = UpstreamTLSConfig()


class AdminConfig(Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9187
    #: environment variable holding the bearer token for POST actions
    token_env: str = "DUALWRITE_ADMIN_TOKEN"  # noqa: S105 - the variable's name, not a secret
    #: unauthenticated attempts are audited as one row per this many seconds (with a count),
    #: so anyone who can reach the port cannot fill the audit table
    unauthorized_audit_window_seconds: PositiveSeconds = 60.0


class LimitsConfig(Strict):
    max_client_connections: Annotated[int, Field(ge=1)] = 1000
    #: largest client message accepted; PostgreSQL's own ceiling is 1 GiB
    max_message_bytes: Annotated[int, Field(ge=1024, le=1 << 30)] = 64 << 20
    startup_timeout_seconds: PositiveSeconds = 10.0
    #: bytes queued towards a slow peer before the other side stops being read
    write_buffer_high_bytes: Annotated[int, Field(ge=4096)] = 1 << 20
    #: server-side prepared statements per connection for the shapes of simple-protocol
    #: writes to mapped tables (least recently used deallocated first); 0 turns them off
    prepared_writes_per_connection: Annotated[int, Field(ge=0, le=10000)] = 256


class RelayConfig(Strict):
    """How client connections are relayed once they are authenticated."""

    #: the native relay loop (proxy/native.py): ``auto`` uses it when the C extension is built
    #: and the connection qualifies (no TLS, no statement logging, no shadow reads unless
    #: ``native_shadow``); ``on`` is the same but a sidecar without the extension refuses to
    #: start; ``off`` relays everything in Python
    native: Literal["auto", "on", "off"] = "auto"
    #: with shadow reads on, relay sessions in the native loop too: it samples the eligible
    #: simple Queries itself and hands Python only the sampled ones. Off by default: each
    #: hand-back costs more than the Python path's read, so it pays only where eligible
    #: reads are a small share of the traffic (README, *Shadow reads* benchmark)
    native_shadow: bool = False

    @field_validator("native", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted on/off (and yes/no, true/false) as a boolean
        if value is True:
            return "on"
        if value is False:
            return "off"
        return value


class ShutdownConfig(Strict):
    #: how long open transactions may run after SIGTERM before their connections are closed
    grace_seconds: Annotated[float, Field(ge=0)] = 30.0


class LoggingConfig(Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"
    #: log statement text (first 200 chars); only honoured when level is debug
    log_statements: bool = False


class ToleranceRule(Strict):
    """A difference the migration makes on purpose, not to be reported as divergence."""

    #: target column the rule applies to
    column: str
    #: compare numbers rounded to this many decimal places
    numeric_scale: Annotated[int, Field(ge=0, le=30)] | None = None
    #: compare timestamps truncated to this unit
    timestamp_precision: Literal["second", "millisecond", "minute", "hour", "day"] | None = None
    #: treat NULL and '' as equal
    null_equals_empty: bool = False
    #: compare text case-insensitively
    case_insensitive: bool = False
    #: ignore trailing spaces (char(n) against text)
    ignore_trailing_spaces: bool = False


class MappingCompareConfig(Strict):
    """How the reconciler compares one mapping."""

    tolerances: list[ToleranceRule] = []
    #: target columns whose values may appear in findings and reports; the rest are redacted
    reveal_columns: list[str] = []


class InvariantConfig(Strict):
    """A business rule the migration must keep, checked by ``dualwrite reconcile``.

    ``kind: compare`` (the default): ``old`` and ``new`` are SELECTs returning
    ``(group..., value...)`` rows, the first ``len(group)`` columns naming the group (e.g. tenant
    and day) and the rest its figures (count, sums); every group must have the same figures on
    both sides. ``kind: new_only``: ``new`` alone, a SELECT that must return no rows (orphans,
    broken foreign keys, a total that disagrees with its lines); each row it returns is a
    failing group. Both are read in chunks of ``chunk_groups`` groups (keyset over the group
    columns), each chunk one statement under ``statement_timeout_ms``.
    """

    name: str
    kind: Literal["compare", "new_only"] = "compare"
    #: what the rule means, in words, shown in the report
    description: str = ""
    #: names of the leading output columns that identify a group (also the chunking order)
    group: Annotated[list[str], Field(min_length=1, max_length=8)]
    #: the group column holding the tenant id, for per-tenant verdicts
    tenant: str | None = None
    old: str | None = None
    new: str
    chunk_groups: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    statement_timeout_ms: Annotated[int, Field(ge=100)] = 30_000

    @field_validator("name")
    @classmethod
    def _name_is_simple(cls, value: str) -> str:
        return _check_name(value)

    @field_validator("group")
    @classmethod
    def _group_names_are_simple(cls, value: list[str]) -> list[str]:
        for column in value:
            _check_name(column)
        if len(set(value)) != len(value):
            raise ValueError("group lists a column twice")
        return value

    @field_validator("old", "new")
    @classmethod
    def _is_one_select(cls, value: str | None) -> str | None:
        return None if value is None else check_select(value)

    @model_validator(mode="after")
    def _sides_match_kind(self) -> InvariantConfig:
        if self.kind == "compare" and self.old is None:
            raise ValueError("kind compare needs an old query (or use kind: new_only)")
        if self.kind == "new_only" and self.old is not None:
            raise ValueError("kind new_only checks the new schema alone: remove old")
        if self.tenant is not None and self.tenant not in self.group:
            raise ValueError(f"tenant {self.tenant!r} is not one of the group columns")
        return self


class MappingConfig(Strict):
    """One ``source table -> target table`` mirror (see docs/architecture.md)."""

    name: str
    source: str
    target: str
    key: Annotated[list[str], Field(min_length=1)]
    columns: Annotated[dict[str, str], Field(min_length=1)]
    filter: str | None = None
    #: SQL condition over a target row: the rows this mapping owns (``channel = 'pos'``).
    #: Reconcile, repair and backfill consider only these, and never delete another's row;
    #: required when the target has other writers (a merge, a reverse mapping)
    target_filter: str | None = None
    mode: MirrorMode = MirrorMode.OUTBOX
    #: where changes are captured: the statements the proxy sees, the WAL, or both
    capture: Capture = Capture.STATEMENT
    unsupported: Literal["passthrough", "reject"] = "passthrough"
    #: target column holding the tenant id, for per-tenant divergence breakdowns
    tenant_column: str | None = None
    #: the target table lives in another database (blue-green, version upgrade): keys are
    #: captured in the source database's outbox and the applier writes them there
    target_dsn: str | None = None
    compare: MappingCompareConfig = MappingCompareConfig()
    #: business rules over this mapping's tables (old read from the source database, new from
    #: the target's)
    invariants: list[InvariantConfig] = []

    @field_validator("target_dsn")
    @classmethod
    def _target_dsn_has_no_password(cls, value: str | None) -> str | None:
        return None if value is None else check_dsn(value)

    @field_validator("name")
    @classmethod
    def _name_is_simple(cls, value: str) -> str:
        return _check_name(value)

    @model_validator(mode="after")
    def _key_and_tenant_are_columns(self) -> MappingConfig:
        for column in self.key:
            if column not in self.columns:
                raise ValueError(f"key column {column!r} is not in columns")
        if len(set(self.key)) != len(self.key):
            raise ValueError("key lists a column twice")
        if self.tenant_column is not None and self.tenant_column not in self.columns:
            raise ValueError(f"tenant_column {self.tenant_column!r} is not in columns")
        if self.target_dsn is not None and not self.mode.allows_target_dsn:
            raise ValueError(
                f"mode {self.mode} needs the target in the same database; use outbox"
            )
        problem = capture_problem(self.mode, self.capture)
        if problem is not None:
            raise ValueError(problem)
        for rule in self.compare.tolerances:
            if rule.column not in self.columns:
                raise ValueError(f"compare.tolerances: {rule.column!r} is not in columns")
        for column in self.compare.reveal_columns:
            if column not in self.columns:
                raise ValueError(f"compare.reveal_columns: {column!r} is not in columns")
        return self


class ApplierConfig(Strict):
    """The outbox applier that runs inside ``dualwrite run`` (and as ``dualwrite apply``)."""

    enabled: bool = True
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    #: keys per claim and apply transaction (measured: 2000 drains about 1.5x faster than 500)
    batch_size: Annotated[int, Field(ge=1, le=10000)] = 2000
    poll_interval_seconds: PositiveSeconds = 0.2
    #: a failing key is retried after base * 2**attempts seconds, capped at max
    retry_base_seconds: PositiveSeconds = 1.0
    retry_max_seconds: PositiveSeconds = 300.0
    lock_timeout_ms: Annotated[int, Field(ge=1)] = 200
    statement_timeout_ms: Annotated[int, Field(ge=1)] = 30000


class WalConfig(Strict):
    """The WAL reader of mappings with ``capture: wal`` or ``both`` (logical decoding with
    pgoutput through a publication on their source tables)."""

    #: the logical replication slot (one per source database)
    slot_name: Annotated[str, Field(pattern=r"^[a-z0-9_]{1,63}$")] = "dualwrite"
    #: the publication on the mapped source tables
    publication_name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")] = "dualwrite"
    #: WAL the slot may hold back; past it the WAL-read mappings are marked for resync and the
    #: slot is dropped (loudly) rather than filling the primary's disk
    max_retained_bytes: Annotated[int, Field(ge=1 << 20)] = 1 << 30
    #: stream: how long a batch collects commits before its keys are queued (the mirror lag
    #: added); poll: how often the reader asks for new changes when the last poll found none
    poll_interval_seconds: PositiveSeconds = 0.2
    #: changes taken per batch (whole transactions: a batch may hold more)
    batch_changes: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    #: ``stream``: a logical replication connection (START_REPLICATION), decoded once;
    #: ``poll``: pg_logical_slot_peek_binary_changes on the reader's SQL connection, which
    #: decodes again from the slot's restart_lsn on every poll
    transport: Literal["stream", "poll"] = "stream"


class PressureConfig(Strict):
    """When the reconciler and backfill pause to spare a database under pressure."""

    #: pause while more than this many connections are active (pg_stat_activity)
    max_active_connections: Annotated[int, Field(ge=1)] | None = None
    #: pause while a replica lags by more than this (pg_stat_replication.replay_lag)
    max_replication_lag_seconds: PositiveSeconds | None = None
    #: how long to wait before checking again
    check_interval_seconds: PositiveSeconds = 5.0


class ReconcileConfig(Strict):
    """The reconciler (``dualwrite reconcile`` and the continuous pass in ``run``)."""

    chunk_rows: Annotated[int, Field(ge=10, le=1_000_000)] = 50_000
    #: same-database passes: sessions comparing chunks side by side (each chunk is still one
    #: statement in one snapshot); 1 keeps a pass to one session, one core of the server
    workers: Annotated[int, Field(ge=1, le=16)] = 1
    #: throttle: rows compared per second (None: as fast as the database allows)
    rows_per_second: Annotated[int, Field(ge=1)] | None = None
    statement_timeout_ms: Annotated[int, Field(ge=100)] = 60_000
    #: across databases: a divergent key is re-checked after this delay before it counts
    recheck_delay_seconds: Annotated[float, Field(ge=0)] = 5.0
    #: run a pass over every mapping this often inside `dualwrite run` (None: never)
    interval_seconds: PositiveSeconds | None = None
    #: divergent keys kept as samples per mapping and class
    max_samples: Annotated[int, Field(ge=0, le=10_000)] = 20
    pressure: PressureConfig = PressureConfig()


class BackfillConfig(Strict):
    chunk_rows: Annotated[int, Field(ge=1, le=100_000)] = 1000
    #: throttle: rows copied per second (None: as fast as the database allows)
    rows_per_second: Annotated[int, Field(ge=1)] | None = None


class CutoverCriteria(Strict):
    """What the cutover report requires for GO (per mapping)."""

    #: reconcile passes with zero divergence covering at least this many hours
    clean_window_hours: Annotated[float, Field(ge=0)] = 24.0
    max_dead_letters: Annotated[int, Field(ge=0)] = 0
    max_outbox_age_seconds: Annotated[float, Field(ge=0)] = 60.0
    max_unmirrored_statements: Annotated[int, Field(ge=0)] = 0
    require_backfill_complete: bool = True
    max_mirror_failures: Annotated[int, Field(ge=0)] = 0
    #: committed changes (capture: both) that statement capture missed and the WAL reader found
    max_uncaptured_changes: Annotated[int, Field(ge=0)] = 0
    #: shadow reads replayed and compared (0: the shadow criteria are not required)
    min_shadow_statements: Annotated[int, Field(ge=0)] = 0
    #: mismatched / (matched + mismatched) shadow reads at most
    max_shadow_mismatch_ratio: Annotated[float, Field(ge=0, le=1)] = 0.0
    #: failing groups tolerated in each invariant's latest check (which must have run)
    max_invariant_failures: Annotated[int, Field(ge=0)] = 0


class ReportConfig(Strict):
    criteria: CutoverCriteria = CutoverCriteria()
    #: tenants the per-tenant table and metrics always list (others appear when evidence
    #: names them: divergent rows, dead letters, failing invariant groups, tenant passes)
    tenants: list[str] = []


Severity = Literal["error", "warning", "info"]


class LintLiveConfig(Strict):
    """The rates ``dualwrite lint --live`` predicts durations with (measure your own server)."""

    #: a table rewrite (ALTER COLUMN TYPE, VACUUM FULL, a volatile default): heap MB per second
    rewrite_mb_per_second: PositiveSeconds = 50.0
    #: a full scan under a lock (SET NOT NULL, VALIDATE, a new CHECK or FOREIGN KEY): MB per second
    scan_mb_per_second: PositiveSeconds = 200.0
    #: an index build (CREATE INDEX, a UNIQUE or PRIMARY KEY constraint): heap MB per second
    index_mb_per_second: PositiveSeconds = 30.0
    #: lock holders listed per finding (oldest transaction first)
    max_blockers: Annotated[int, Field(ge=1, le=100)] = 5


class LintConfig(Strict):
    """``dualwrite lint``: which rules run for this project and when a finding fails the run."""

    #: rule ids never reported for this project (a file can disable more with a comment)
    disable: list[str] = []
    #: rule id -> severity, replacing the rule's own
    severity: dict[str, Severity] = {}
    #: exit 1 when a finding is at or above this severity (``--fail-on`` overrides)
    fail_on: Severity = "error"
    #: traffic evidence looks back this far (``--since`` overrides)
    since: str = "7d"
    #: PostgreSQL major version the static rules assume when not ``--live``
    pg_version: Annotated[int, Field(ge=11, le=30)] = 15
    live: LintLiveConfig = LintLiveConfig()

    @field_validator("disable")
    @classmethod
    def _disable_are_rule_ids(cls, value: list[str]) -> list[str]:
        for rule in value:
            _check_rule_id(rule)
        return value

    @field_validator("severity")
    @classmethod
    def _severity_keys_are_rule_ids(cls, value: dict[str, str]) -> dict[str, str]:
        for rule in value:
            _check_rule_id(rule)
        return value

    @field_validator("since")
    @classmethod
    def _since_is_a_duration(cls, value: str) -> str:
        parse_duration(value)
        return value


class TrafficConfig(Strict):
    """What the sidecar records about the application's statements: per fingerprint, the
    relations and columns referenced and when last seen (never a literal value)."""

    enabled: bool = True
    #: fingerprints kept in the control schema; the least recently seen are evicted beyond it
    max_fingerprints: Annotated[int, Field(ge=100, le=1_000_000)] = 10_000
    #: statement texts waiting to be analysed; more are dropped and counted, never waited for
    queue_size: Annotated[int, Field(ge=10, le=1_000_000)] = 10_000
    #: distinct statement texts remembered, so a repeated statement costs a dict lookup
    cache_size: Annotated[int, Field(ge=10, le=1_000_000)] = 10_000
    #: how often what was seen is written to the control schema
    flush_interval_seconds: PositiveSeconds = 10.0


class ShadowConfig(Strict):
    """Shadow reads: a sample of the application's reads replayed against the new schema's
    compatibility views (or, with ``dsn``, unchanged on another server) and compared."""

    #: fraction of eligible reads replayed (0 turns the shadow off)
    sample_rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    #: the shadow's own connections (a hard cap)
    max_sessions: Annotated[int, Field(ge=1, le=64)] = 4
    #: captured reads waiting for replay; what does not fit is dropped and counted
    queue: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    #: each replayed statement's statement_timeout
    statement_timeout_ms: Annotated[int, Field(ge=1, le=3_600_000)] = 2000
    #: replays started per second at most, so the shadow never loads the primary
    max_replays_per_second: Annotated[float, Field(gt=0, le=100_000)] = 5.0
    #: old relation -> the relation (usually a view) in the new schema that must answer the same
    views: dict[str, str] = {}
    #: replay unchanged against this server instead (e.g. a PostgreSQL upgrade); no password
    dsn: str | None = None
    #: result columns whose values a mismatch sample may show (others are redacted)
    reveal_columns: list[str] = []
    #: how often the per-fingerprint results are written to the control schema
    flush_interval_seconds: PositiveSeconds = 10.0

    @field_validator("views")
    @classmethod
    def _views_are_qualified(cls, value: dict[str, str]) -> dict[str, str]:
        for old, new in value.items():
            for name in (old, new):
                if name.count(".") != 1 or not all(name.split(".")):
                    raise ValueError(f"{name!r} must be schema.relation")
        return value

    @field_validator("dsn")
    @classmethod
    def _dsn_has_no_password(cls, value: str | None) -> str | None:
        return None if value is None else check_dsn(value)

    @model_validator(mode="after")
    def _something_to_compare(self) -> ShadowConfig:
        if self.sample_rate > 0 and not self.views and self.dsn is None:
            raise ValueError("sample_rate > 0 needs views (or a dsn) to compare against")
        if self.views and self.dsn is not None:
            raise ValueError("set views or dsn, not both")
        return self

    @property
    def enabled(self) -> bool:
        return self.sample_rate > 0


class CutoverConfig(Strict):
    """Staged cutover: the tenants whose writes have moved to the new schema.

    Migration-wide: a tenant moves as a whole (every pair below), because the application
    switches a tenant's writes in one deploy and related tables must not be split between two
    sources of truth. For a moved tenant the forward mapping of each pair is paused (its
    ``filter`` and ``target_filter`` leave the tenant out) and the reverse mapping carries the
    tenant's rows from the new table back to the old (its ``filter`` and ``target_filter``
    take the tenant only). Every other tenant stays forward. See docs/architecture.md.
    """

    #: tenant ids (compared as text with the mappings' tenant_column, like ``--tenant``)
    tenants: list[str] = []
    #: forward mapping name -> the mapping that mirrors its target back into its source
    reverse: dict[str, str] = {}

    @field_validator("tenants", mode="before")
    @classmethod
    def _tenant_ids_as_text(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        return value

    @field_validator("tenants")
    @classmethod
    def _tenants_listed_once(cls, value: list[str]) -> list[str]:
        for tenant in value:
            if not tenant:
                raise ValueError("a tenant id cannot be empty")
        if len(set(value)) != len(value):
            raise ValueError("lists a tenant twice")
        return value

    @model_validator(mode="after")
    def _tenants_need_pairs(self) -> CutoverConfig:
        if self.tenants and not self.reverse:
            raise ValueError(
                "tenants are listed but no mapping pair is: set reverse (forward mapping -> "
                "its reverse mapping)"
            )
        return self


class Config(Strict):
    """The whole sidecar configuration (one YAML file)."""

    listen: ListenConfig = ListenConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    #: the sidecar's own connection; DUALWRITE_SERVICE_DSN overrides, passwords from the env
    service_dsn: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    admin: AdminConfig = AdminConfig()
    limits: LimitsConfig = LimitsConfig()
    relay: RelayConfig = RelayConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    logging: LoggingConfig = LoggingConfig()
    #: how the unqualified table names of mappings are resolved (at validation)
    search_path: Annotated[list[str], Field(min_length=1)] = ["public"]
    #: role the application connects as; `dualwrite setup` grants it what the mirror needs
    app_role: str | None = None
    applier: ApplierConfig = ApplierConfig()
    wal: WalConfig = WalConfig()
    reconcile: ReconcileConfig = ReconcileConfig()
    backfill: BackfillConfig = BackfillConfig()
    report: ReportConfig = ReportConfig()
    lint: LintConfig = LintConfig()
    traffic: TrafficConfig = TrafficConfig()
    shadow: ShadowConfig = ShadowConfig()
    mappings: list[MappingConfig] = []
    #: migration-level business rules (both queries run in the service database)
    invariants: list[InvariantConfig] = []
    #: staged per-tenant cutover (which tenants already write the new schema)
    cutover: CutoverConfig = CutoverConfig()

    @field_validator("service_dsn")
    @classmethod
    def _no_password_in_file(cls, value: str) -> str:
        return check_dsn(value)

    @model_validator(mode="after")
    def _mapping_names_unique(self) -> Config:
        seen: set[str] = set()
        for mapping in self.mappings:
            if mapping.name in seen:
                raise ValueError(f"mapping name {mapping.name!r} is used twice")
            seen.add(mapping.name)
        names: set[str] = set()
        for invariant in self.all_invariants():
            if invariant.name in names:
                raise ValueError(f"invariant name {invariant.name!r} is used twice")
            names.add(invariant.name)
        return self

    def all_invariants(self) -> list[InvariantConfig]:
        """Every invariant: migration-level first, then each mapping's."""
        return [*self.invariants, *(i for m in self.mappings for i in m.invariants)]

    def effective_service_dsn(self) -> str:
        """The DSN to connect with: the environment override, else the file's value."""
        return os.environ.get(SERVICE_DSN_ENV) or self.service_dsn

    def mapping(self, name: str) -> MappingConfig:
        for mapping in self.mappings:
            if mapping.name == name:
                return mapping
        raise ConfigError("mappings", f"no mapping named {name!r}")


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``24h``, ``7d``, ``2w`` (a bare number is hours); ValueError otherwise."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30m, 24h, 7d)")
    value, unit = float(match.group(1)), match.group(2) or "h"
    if value <= 0:
        raise ValueError(f"duration must be positive: {text!r}")
    return timedelta(seconds=value * _UNIT_SECONDS[unit])


def _check_name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(
            "must be lower-case letters, digits and _ (max 63), starting with a letter"
        )
    return value


def _check_rule_id(rule: str) -> None:
    if not _RULE_ID.match(rule):
        raise ValueError(f"{rule!r} is not a rule id (lower-case letters, digits and -)")


def _loc_to_path(loc: tuple[int | str, ...], data: Any) -> str:
    """Turn a pydantic error location into ``mappings[0].columns`` form."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.startswith(("function-", "model-")) or part in ("list", "dict"):
            continue
        else:
            path += f".{part}" if path else part
    return path or "(top level)"


def _reason(error: dict[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The config model that holds the key at ``loc`` (None when it is not under a model)."""
    model: type[BaseModel] | None = Config
    for part in loc[:-1]:
        if model is None:
            return None
        if isinstance(part, int) or part not in model.model_fields:
            continue
        model = _model_in(model.model_fields[part].annotation)
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The config model an annotation holds (directly, in a list, or optional)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _did_you_mean(loc: tuple[int | str, ...]) -> str | None:
    model = _model_at(loc)
    if model is None or not isinstance(loc[-1], str):
        return None
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.6)
    return close[0] if close else None


def _problems(exc: ValidationError, data: Any) -> list[tuple[str, str]]:
    """Every validation error as (path, reason): unknown keys first, each with a suggestion.

    A required key reported missing because it was misspelt (``colums``) is the unknown key's
    error, not a second one.
    """
    unknown: list[tuple[str, str]] = []
    explained: set[str] = set()
    other: list[tuple[str, str]] = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        if error["type"] == "extra_forbidden":
            reason = "unknown key"
            suggestion = _did_you_mean(loc)
            if suggestion is not None:
                reason += f" (did you mean {suggestion!r}?)"
                explained.add(_loc_to_path((*loc[:-1], suggestion), data))
            unknown.append((_loc_to_path(loc, data), reason))
    for error in exc.errors():
        if error["type"] == "extra_forbidden":
            continue
        path = _loc_to_path(tuple(error["loc"]), data)
        if error["type"] == "missing" and path in explained:
            continue
        other.append((path, _reason(dict(error))))
    return unknown + other


def parse_config(data: Any, *, source: str | None = None) -> Config:
    """Validate already-loaded YAML data; raise ConfigError (ConfigErrors) naming every bad key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", "the config must be a mapping of keys to values", source=source)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigErrors(_problems(exc, data), source=source) from None

    _check_shared_targets(config, source)
    _check_cutover(config, source)
    return config


def _folded(name: str) -> str:
    """A table name as written, folded as PostgreSQL folds an unquoted one."""
    return name if '"' in name else name.lower()


def _check_cutover(config: Config, source: str | None) -> None:
    """The cutover section names real mapping pairs that can be reversed per tenant.

    Every problem is reported at once, each with its path. What is refused and why:
    a pair whose mappings are not each other's reverse (a loop or a half); a mapping in two
    pairs; a mapping without ``tenant_column`` (nothing to split the rows by); a target in
    another database (the reverse mapping's outbox would live in the new database); and WAL
    capture (the WAL reader sees every change of a source table, including the other
    direction's applier writes: ``both`` would count them as uncaptured changes, and ``wal``
    is not supported for a staged cutover yet).
    """
    cutover = config.cutover
    index = {m.name: i for i, m in enumerate(config.mappings)}
    problems: list[tuple[str, str]] = []
    used: dict[str, str] = {}
    for forward_name, reverse_name in cutover.reverse.items():
        path = f"cutover.reverse.{forward_name}"
        pair = []
        for role, name in (("forward", forward_name), ("reverse", reverse_name)):
            if name not in index:
                problems.append((path, f"no mapping named {name!r} (the {role} mapping)"))
            elif name in used:
                problems.append((path, f"mapping {name} is already in the pair of {used[name]}"))
            else:
                used[name] = forward_name
                pair.append((role, name))
        if forward_name == reverse_name:
            problems.append((path, "a mapping cannot be its own reverse"))
            continue
        if len(pair) != 2:
            continue
        forward = config.mappings[index[forward_name]]
        reverse = config.mappings[index[reverse_name]]
        if (_folded(reverse.source), _folded(reverse.target)) != (
            _folded(forward.target),
            _folded(forward.source),
        ):
            problems.append(
                (
                    path,
                    f"{reverse_name} ({reverse.source} -> {reverse.target}) is not the reverse "
                    f"of {forward_name} ({forward.source} -> {forward.target}): its source must "
                    "be the forward target and its target the forward source",
                )
            )
        for _, name in pair:
            mapping = config.mappings[index[name]]
            at = f"mappings[{index[name]}]"
            if mapping.tenant_column is None:
                problems.append(
                    (
                        f"{at}.tenant_column",
                        f"required: mapping {name} is in cutover.reverse, and a staged "
                        "cutover splits its rows by tenant",
                    )
                )
            if mapping.target_dsn is not None:
                problems.append(
                    (
                        f"{at}.target_dsn",
                        f"mapping {name} is in cutover.reverse: a staged cutover needs old and "
                        "new tables in one database (the reverse mapping's keys are captured "
                        "in the database of its source)",
                    )
                )
            if mapping.capture.reads_wal:
                problems.append(
                    (
                        f"{at}.capture",
                        f"mapping {name} is in cutover.reverse: a staged cutover needs "
                        "capture: statement (the WAL reader sees every change of a source "
                        "table, including the other direction's applier writes)",
                    )
                )
    if cutover.reverse:
        for mapping in config.mappings:
            if mapping.tenant_column is not None and mapping.name not in used:
                problems.append(
                    (
                        "cutover.reverse",
                        f"mapping {mapping.name} has a tenant_column but no reverse mapping: a "
                        f"moved tenant's writes to {mapping.target} would never reach "
                        f"{mapping.source}; add `{mapping.name}: <a mapping from "
                        f"{mapping.target} to {mapping.source}>`",
                    )
                )
    if problems:
        raise ConfigErrors(problems, source=source)


def _check_shared_targets(config: Config, source: str | None) -> None:
    """Mappings that write one target must each say which of its rows they own.

    Names are compared as written (``validate_all`` compares the resolved tables too).
    """
    writers: dict[tuple[str, str | None], list[int]] = {}
    for index, mapping in enumerate(config.mappings):
        # PostgreSQL folds unquoted names to lower case; quoted ones are compared as written
        name = mapping.target if '"' in mapping.target else mapping.target.lower()
        writers.setdefault((name, mapping.target_dsn), []).append(index)
    for indexes in writers.values():
        if len(indexes) < 2:
            continue
        for index in indexes:
            mapping = config.mappings[index]
            if mapping.target_filter is None:
                others = ", ".join(
                    config.mappings[i].name for i in indexes if i != index
                )
                raise ConfigError(
                    f"mappings[{index}].target_filter",
                    f"required: mapping {mapping.name} writes {mapping.target} with {others}; "
                    "set target_filter to the condition naming the target rows this mapping "
                    "owns (e.g. \"channel = 'pos'\")",
                    source=source,
                )


def duplicate_keys(text: str) -> list[tuple[str, str]]:
    """(path, reason) of every key written twice in one YAML mapping (YAML keeps the last)."""
    problems: list[tuple[str, str]] = []

    def walk(node: yaml.Node, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                child = f"{path}.{key}" if path else str(key)
                line = key_node.start_mark.line + 1
                if key is not None and key in seen:
                    problems.append(
                        (child, f"duplicate key (line {line}, first on line {seen[key]})")
                    )
                elif key is not None:
                    seen[key] = line
                walk(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, f"{path}[{index}]")

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, "")
    return problems


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file; every problem in it is reported at once."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read config: {exc.strerror}", source=source) from None
    try:
        data = yaml.safe_load(text)
        duplicates = duplicate_keys(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "YAML"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(where, f"invalid YAML: {problem}", source=source) from None
    try:
        config = parse_config(data, source=source)
    except ConfigErrors as exc:
        unknown = [p for p in exc.problems if p[1].startswith("unknown key")]
        rest = exc.problems[len(unknown) :]
        raise ConfigErrors(unknown + duplicates + rest, source=source) from None
    if duplicates:
        raise ConfigErrors(duplicates, source=source)
    return config
