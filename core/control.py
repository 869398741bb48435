"""The ``dualwrite`` control schema: its DDL (versioned, applied idempotently by ``setup``),
the per-mapping delete functions and the per-mapping run state (paused or not); the
application role's grants are core/privileges.py's.

Everything that must survive a restart or be shared between sidecars lives here: the outbox,
dead letters, pause flags, unmirrored-statement marks, mirror activity, and (added by later
schema versions) reconcile history, admin actions and traffic evidence (core/traffic.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from core.errors import ControlSchemaMissing, DatabaseUnreachable
from core.logs import get_logger
from core.mapping import SRC, TGT, CompiledMapping
from core.sqltext import QualifiedName

SCHEMA = "dualwrite"
#: NOTIFY channel on which pause/resume changes are announced to every sidecar
CONTROL_CHANNEL = "dualwrite_control"
#: classid of the advisory locks dualwrite takes (two-int form, so it never meets an
#: application's single-bigint advisory locks)
LOCK_CLASS = 0x6477  # "dw"

_log = get_logger("control")

#: (version, DDL) in order; never edit a released step, append a new one.
MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE dualwrite.outbox (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            mapping text NOT NULL,
            key jsonb NOT NULL,
            enqueued_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX outbox_mapping_id ON dualwrite.outbox (mapping, id);

        CREATE TABLE dualwrite.dead_letters (
            mapping text NOT NULL,
            key jsonb NOT NULL,
            error text NOT NULL,
            sqlstate text,
            attempts integer NOT NULL DEFAULT 1,
            first_failed_at timestamptz NOT NULL DEFAULT now(),
            last_failed_at timestamptz NOT NULL DEFAULT now(),
            next_attempt_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (mapping, key)
        );
        CREATE INDEX dead_letters_due ON dualwrite.dead_letters (next_attempt_at);

        CREATE TABLE dualwrite.mapping_state (
            mapping text PRIMARY KEY,
            paused boolean NOT NULL DEFAULT false,
            updated_at timestamptz NOT NULL DEFAULT now(),
            updated_by text
        );

        CREATE TABLE dualwrite.unmirrored_events (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            mapping text NOT NULL,
            reason text NOT NULL,
            statements bigint NOT NULL DEFAULT 1,
            sidecar text,
            at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX unmirrored_events_at ON dualwrite.unmirrored_events (mapping, at);

        CREATE TABLE dualwrite.mirror_activity (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            sidecar text NOT NULL,
            mapping text NOT NULL,
            operation text NOT NULL,
            statements bigint NOT NULL,
            rows bigint NOT NULL,
            failures bigint NOT NULL,
            period_start timestamptz NOT NULL,
            period_end timestamptz NOT NULL
        );
        CREATE INDEX mirror_activity_end ON dualwrite.mirror_activity (mapping, period_end);
        """,
    ),
    (
        2,
        """
        -- One row per reconcile pass, repair or backfill run: the history the report reads.
        CREATE TABLE dualwrite.reconcile_runs (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            mapping text NOT NULL,
            kind text NOT NULL CHECK (kind IN ('reconcile', 'repair', 'backfill')),
            status text NOT NULL DEFAULT 'running'
                CHECK (status IN ('running', 'done', 'failed', 'interrupted')),
            started_at timestamptz NOT NULL DEFAULT now(),
            finished_at timestamptz,
            method text,                 -- same_database | cross_database
            tenant text,                 -- set when the run was limited to one tenant
            range_start jsonb,           -- first key covered
            range_end jsonb,             -- last key covered
            checkpoint jsonb,            -- last key fully done (resume point)
            rows_compared bigint NOT NULL DEFAULT 0,
            missing bigint NOT NULL DEFAULT 0,
            extra bigint NOT NULL DEFAULT 0,
            changed bigint NOT NULL DEFAULT 0,
            pending bigint NOT NULL DEFAULT 0,
            repaired bigint NOT NULL DEFAULT 0,
            clean boolean,
            by_tenant jsonb,             -- {"<tenant>": {"missing": n, "extra": n, "changed": n}}
            by_column jsonb,             -- {"<column>": n} among changed rows
            dry_run boolean NOT NULL DEFAULT false,
            error text,
            sidecar text,
            requested_by text
        );
        CREATE INDEX reconcile_runs_mapping ON dualwrite.reconcile_runs (mapping, kind, started_at);

        -- Samples of divergent keys (values only for reveal_columns; the rest redacted).
        CREATE TABLE dualwrite.reconcile_findings (
            run_id bigint NOT NULL REFERENCES dualwrite.reconcile_runs (id) ON DELETE CASCADE,
            mapping text NOT NULL,
            class text NOT NULL CHECK (class IN ('missing', 'extra', 'changed')),
            key jsonb NOT NULL,
            tenant text,
            columns text[],
            expected jsonb,
            actual jsonb,
            found_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX reconcile_findings_run ON dualwrite.reconcile_findings (run_id);

        -- Every repair: who, when, which keys, before/after counts.
        CREATE TABLE dualwrite.repairs (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            run_id bigint REFERENCES dualwrite.reconcile_runs (id) ON DELETE SET NULL,
            mapping text NOT NULL,
            requested_by text,
            at timestamptz NOT NULL DEFAULT now(),
            dry_run boolean NOT NULL,
            keys jsonb NOT NULL,
            divergent_before bigint NOT NULL,
            divergent_after bigint,
            upserted bigint NOT NULL DEFAULT 0,
            deleted bigint NOT NULL DEFAULT 0
        );

        -- Backfill progress per mapping: resumable after a kill.
        CREATE TABLE dualwrite.backfill_state (
            mapping text PRIMARY KEY,
            status text NOT NULL CHECK (status IN ('running', 'done', 'failed', 'interrupted')),
            started_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now(),
            finished_at timestamptz,
            high_water jsonb,            -- the last source key when the backfill started
            checkpoint jsonb,            -- last key copied
            rows_done bigint NOT NULL DEFAULT 0,
            rows_estimate bigint
        );

        -- Admin API actions (pause, resume, reconcile...): time, parameters, outcome.
        CREATE TABLE dualwrite.admin_actions (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            at timestamptz NOT NULL DEFAULT now(),
            action text NOT NULL,
            params jsonb NOT NULL DEFAULT '{}',
            outcome text NOT NULL,
            sidecar text
        );
        """,
    ),
    (
        3,
        """
        -- Traffic evidence for `dualwrite lint` and the report: per statement fingerprint, the
        -- relations and columns it references and when it was seen (names only, no values).
        -- refs: [{"schema": text or null when unqualified, "relation": text, "columns": [...]}]
        CREATE TABLE dualwrite.traffic_statements (
            fingerprint text PRIMARY KEY,
            kind text NOT NULL,
            refs jsonb NOT NULL,
            calls bigint NOT NULL DEFAULT 0,
            first_seen timestamptz NOT NULL,
            last_seen timestamptz NOT NULL
        );
        CREATE INDEX traffic_statements_last_seen ON dualwrite.traffic_statements (last_seen);

        -- One row per recording sidecar process: what the evidence covers, and its gaps.
        CREATE TABLE dualwrite.traffic_recorders (
            sidecar text PRIMARY KEY,
            started_at timestamptz NOT NULL,
            last_flush_at timestamptz NOT NULL,
            statements bigint NOT NULL DEFAULT 0,
            dropped bigint NOT NULL DEFAULT 0,
            last_dropped_at timestamptz,
            evicted_through timestamptz
        );
        """,
    ),
    (
        4,
        """
        -- The WAL reader's bookkeeping per slot: the position up to which every change has been
        -- queued (written in the transaction that queues them; a re-read skips what is below).
        CREATE TABLE dualwrite.wal_progress (
            slot text PRIMARY KEY,
            lsn pg_lsn NOT NULL,
            transactions bigint NOT NULL DEFAULT 0,
            changes bigint NOT NULL DEFAULT 0,
            reader text,
            updated_at timestamptz NOT NULL DEFAULT now()
        );

        -- capture: both. Each committed change of a source that statement capture did not
        -- record (a function, a DO block, a trigger, COPY, a connection around the sidecar).
        CREATE TABLE dualwrite.uncaptured_changes (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            mapping text NOT NULL,
            xid bigint NOT NULL,
            commit_time timestamptz NOT NULL,
            lsn pg_lsn NOT NULL,
            operation text NOT NULL,
            key jsonb NOT NULL,
            found_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX uncaptured_changes_mapping ON dualwrite.uncaptured_changes (mapping, found_at);

        -- Mappings whose target can no longer be trusted from capture alone (a TRUNCATE of the
        -- source, a slot dropped for retaining too much WAL): they need a full resync.
        CREATE TABLE dualwrite.resync_needed (
            mapping text PRIMARY KEY,
            reason text NOT NULL,
            events bigint NOT NULL DEFAULT 1,
            first_at timestamptz NOT NULL DEFAULT now(),
            last_at timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    (
        5,
        """
        -- Shadow reads (proxy/shadow, core/shadow.py): per statement fingerprint, how the
        -- replays against the new schema came out, and one sample per outcome (the statement
        -- normalized, values redacted but for shadow.reveal_columns).
        CREATE TABLE dualwrite.shadow_statements (
            fingerprint text PRIMARY KEY,
            statement text NOT NULL,
            matched bigint NOT NULL DEFAULT 0,
            mismatched bigint NOT NULL DEFAULT 0,
            noise bigint NOT NULL DEFAULT 0,
            errors bigint NOT NULL DEFAULT 0,
            unsafe bigint NOT NULL DEFAULT 0,
            first_seen timestamptz NOT NULL,
            last_seen timestamptz NOT NULL,
            samples jsonb NOT NULL DEFAULT '{}'
        );
        -- Latency samples of compared replays: the original (old) and the new side.
        CREATE TABLE dualwrite.shadow_latency (
            at timestamptz NOT NULL DEFAULT now(),
            fingerprint text NOT NULL,
            old_ms double precision NOT NULL,
            new_ms double precision NOT NULL
        );
        CREATE INDEX shadow_latency_at ON dualwrite.shadow_latency (at);
        """,
    ),
    (
        6,
        """
        -- One row per invariant check (config invariants:, evaluated by `dualwrite reconcile`).
        CREATE TABLE dualwrite.invariant_runs (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            invariant text NOT NULL,
            mapping text,                -- NULL: a migration-level invariant
            kind text NOT NULL CHECK (kind IN ('compare', 'new_only')),
            status text NOT NULL DEFAULT 'running'
                CHECK (status IN ('running', 'done', 'failed', 'interrupted')),
            started_at timestamptz NOT NULL DEFAULT now(),
            finished_at timestamptz,
            tenant text,                 -- set when the check was limited to one tenant
            groups_checked bigint NOT NULL DEFAULT 0,
            groups_failed bigint NOT NULL DEFAULT 0,
            -- {"<tenant>": failing groups} when the invariant names its tenant column
            by_tenant jsonb,
            error text,
            sidecar text,
            requested_by text
        );
        CREATE INDEX invariant_runs_name ON dualwrite.invariant_runs (invariant, started_at);

        -- The failing groups of a check (the first 1000): group values and both sides' figures.
        CREATE TABLE dualwrite.invariant_failures (
            run_id bigint NOT NULL REFERENCES dualwrite.invariant_runs (id) ON DELETE CASCADE,
            invariant text NOT NULL,
            grp jsonb NOT NULL,          -- {"<group column>": value}
            tenant text,
            old_values jsonb,            -- NULL: the group is missing on the old side
            new_values jsonb,            -- NULL: the group is missing on the new side
            found_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX invariant_failures_run ON dualwrite.invariant_failures (run_id);
        """,
    ),
    (
        7,
        """
        -- Repairs on the record: why, and each row's before- and after-image in the target
        -- (redacted to reveal_columns like findings):
        -- [{"key": [...], "class": "missing", "before": {...} or null, "after": {...} or null}]
        ALTER TABLE dualwrite.repairs ADD COLUMN reason text, ADD COLUMN images jsonb;
        CREATE INDEX repairs_mapping_at ON dualwrite.repairs (mapping, at);

        -- the names of an invariant's value columns, so failing groups read as figures
        ALTER TABLE dualwrite.invariant_runs ADD COLUMN value_columns text[];
        """,
    ),
    (
        8,
        """
        -- Divergent keys a pass found in the dead letters: stuck, not in flight; a pass that
        -- meets one is not clean.
        ALTER TABLE dualwrite.reconcile_runs
            ADD COLUMN dead_lettered bigint NOT NULL DEFAULT 0;
        """,
    ),
    (
        9,
        """
        -- Staged cutover: the tenants that had moved when a pass of a cutover pair's mapping
        -- ran (NULL: not in a pair), so the report counts a pass only for the tenants the
        -- mapping carried then.
        ALTER TABLE dualwrite.reconcile_runs ADD COLUMN cutover_tenants text[];
        """,
    ),
    (
        10,
        """
        -- Shadow reads per tenant (core/shadow.py): the replays attributed to each tenant (the
        -- tenant_column values of the rows that differ or, for the other outcomes, of the rows
        -- answered; else the tenant the statement's WHERE names). One row with attributed =
        -- false (tenant '') counts the replays no tenant could be found for.
        CREATE TABLE dualwrite.shadow_tenants (
            attributed boolean NOT NULL,
            tenant text NOT NULL,
            matched bigint NOT NULL DEFAULT 0,
            mismatched bigint NOT NULL DEFAULT 0,
            noise bigint NOT NULL DEFAULT 0,
            errors bigint NOT NULL DEFAULT 0,
            unsafe bigint NOT NULL DEFAULT 0,
            first_seen timestamptz NOT NULL,
            last_seen timestamptz NOT NULL,
            last_mismatch text,          -- the fingerprint of the latest mismatch
            PRIMARY KEY (attributed, tenant)
        );
        """,
    ),
]


async def current_version(conn: asyncpg.Connection) -> int:
    """The control schema version installed (0 when absent)."""
    exists = await conn.fetchval("SELECT to_regclass('dualwrite.schema_version') IS NOT NULL")
    if not exists:
        return 0
    return int(
        await conn.fetchval("SELECT coalesce(max(version), 0) FROM dualwrite.schema_version")
    )


def latest_version() -> int:
    return MIGRATIONS[-1][0]


async def ensure_current(conn: asyncpg.Connection) -> None:
    """Raise ControlSchemaMissing unless ``setup`` has installed the latest version."""
    version = await current_version(conn)
    if version < latest_version():
        raise ControlSchemaMissing(
            f"control schema {SCHEMA} is at version {version}, this dualwrite needs "
            f"{latest_version()}: run `dualwrite setup --config FILE`"
        )


async def install(conn: asyncpg.Connection) -> list[int]:
    """Create or upgrade the control schema; return the versions applied (empty: nothing to do)."""
    applied: list[int] = []
    async with conn.transaction():
        # Serialise concurrent `setup` runs (two pods starting at once).
        await conn.execute("SELECT pg_advisory_xact_lock($1, 0)", LOCK_CLASS)
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS dualwrite.schema_version ("
            "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        have = await current_version(conn)
        for version, ddl in MIGRATIONS:
            if version > have:
                await conn.execute(ddl)
                await conn.execute(
                    "INSERT INTO dualwrite.schema_version (version) VALUES ($1)", version
                )
                applied.append(version)
    return applied


# --- the per-mapping delete functions -----------------------------------------------------
#
# A statement that writes the target itself (sync mode, see core/modes.py) deletes target
# rows through a function, not a DELETE in its own WITH list: every part of one statement
# shares one snapshot, and a DELETE there cannot see a target row that a concurrent
# transaction committed after that snapshot was taken (a move into the target, waited for on
# the source row's lock). A VOLATILE function's statements take a fresh snapshot under READ
# COMMITTED, so the delete sees that row. ``setup`` creates one per same-database mapping;
# validation checks it matches the mapping; the rewrite calls it.

#: parameter of the delete functions (named so no target column can shadow it)
DELETE_KEYS_PARAM = "_dualwrite_keys"


def delete_function(mapping: CompiledMapping) -> QualifiedName:
    """The name of the mapping's delete function (hashed when too long for an identifier)."""
    name = f"mirror_delete__{mapping.name}"
    if len(name) > 63:
        name = f"mirror_delete__{hashlib.sha256(mapping.name.encode()).hexdigest()[:16]}"
    return QualifiedName(SCHEMA, name)


def delete_function_body(mapping: CompiledMapping) -> str:
    """The PL/pgSQL body of :func:`delete_function` (compared by validation)."""
    _, target, _ = mapping.binding()
    # never a row another writer owns (unchanged text for a mapping without target_filter)
    owned = "" if mapping.target_filter is None else f" AND {mapping.owned_sql()}"
    return (
        "\nDECLARE deleted bigint;\nBEGIN\n"
        f"  DELETE FROM {target.sql} AS {TGT} WHERE ({mapping.target_key_list(TGT)}) IN "
        f"({mapping.keys_from_json_sql(DELETE_KEYS_PARAM)}){owned};\n"
        "  GET DIAGNOSTICS deleted = ROW_COUNT;\n  RETURN deleted;\nEND\n"
    )


def delete_function_ddl(mapping: CompiledMapping) -> str:
    """CREATE OR REPLACE of the mapping's delete function (idempotent)."""
    return (
        f"CREATE OR REPLACE FUNCTION {delete_function(mapping).sql}({DELETE_KEYS_PARAM} jsonb) "
        "RETURNS bigint "
        "LANGUAGE plpgsql VOLATILE SECURITY INVOKER "
        "SET search_path = pg_catalog, pg_temp "
        f"AS $dualwrite${delete_function_body(mapping)}$dualwrite$"
    )


def delete_call_sql(mapping: CompiledMapping, from_sql: str, *, only_filtered_out: bool) -> str:
    """One row: the target rows keyed by ``from_sql``'s rows deleted (filtered-out only)."""
    cond = f"WHERE NOT {mapping.filter_sql()}" if only_filtered_out else ""
    return (
        f"SELECT {delete_function(mapping).sql}(coalesce(pg_catalog.jsonb_agg("
        f"{mapping.key_json_sql()}), '[]'::pg_catalog.jsonb)) AS deleted "
        f"FROM {from_sql} AS {SRC} {cond}"
    )


async def create_delete_functions(
    conn: asyncpg.Connection, mappings: Sequence[CompiledMapping]
) -> None:
    """Create (or replace) the delete function of every same-database mapping (``setup``).

    Whatever the mode: the function depends only on the target and the key, so a mapping
    later switched to sync mode finds it in place.
    """
    for mapping in mappings:
        if not mapping.cross_database:
            await conn.execute(delete_function_ddl(mapping))


async def delete_function_problem(conn: asyncpg.Connection, mapping: CompiledMapping) -> str | None:
    """Why the mapping's delete function cannot be used (None: it matches and prepares)."""
    source, _, _ = mapping.binding()
    function = delete_function(mapping)
    body = await conn.fetchval(
        "SELECT prosrc FROM pg_proc WHERE oid = to_regprocedure($1)", f"{function.sql}(jsonb)"
    )
    if body != delete_function_body(mapping):
        state = "is missing" if body is None else "does not match the mapping"
        return f"function {function} {state}: run `dualwrite setup --config FILE`"
    try:
        await conn.prepare(delete_call_sql(mapping, source.sql, only_filtered_out=True))
    except asyncpg.PostgresError as exc:
        return f"delete function call: {exc}"
    return None


@dataclass
class MappingStates:
    """Which mappings are paused, kept current from the control schema (LISTEN + poll)."""

    paused: frozenset[str] = frozenset()
    #: bumped on every change, so caches keyed on state know when to drop entries
    version: int = 0
    listeners: list[Callable[[], None]] = field(default_factory=list)

    def is_paused(self, mapping: str) -> bool:
        return mapping in self.paused

    def update(self, paused: frozenset[str]) -> None:
        if paused != self.paused:
            self.paused = paused
            self.version += 1
            for listener in self.listeners:
                listener()


async def load_paused(conn: asyncpg.Connection) -> frozenset[str]:
    rows = await conn.fetch("SELECT mapping FROM dualwrite.mapping_state WHERE paused")
    return frozenset(r["mapping"] for r in rows)


async def set_paused(conn: asyncpg.Connection, mapping: str, paused: bool, *, by: str) -> None:
    """Pause or resume a mapping for every sidecar (persisted, then announced)."""
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO dualwrite.mapping_state (mapping, paused, updated_at, updated_by) "
            "VALUES ($1, $2, now(), $3) ON CONFLICT (mapping) DO UPDATE "
            "SET paused = EXCLUDED.paused, updated_at = now(), updated_by = EXCLUDED.updated_by",
            mapping,
            paused,
            by,
        )
        await conn.execute("SELECT pg_notify($1, $2)", CONTROL_CHANNEL, mapping)


class StateWatcher:
    """Keeps a MappingStates current: LISTEN for changes, and poll as a safety net."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        states: MappingStates,
        poll_seconds: float = 5.0,
    ) -> None:
        self._connect = connect
        self.states = states
        self._poll_seconds = poll_seconds
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def _notified(self, *_args: Any) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await self._connect()
                await conn.add_listener(CONTROL_CHANNEL, self._notified)
                while True:
                    self.states.update(await load_paused(conn))
                    self._wake.clear()
                    try:
                        async with asyncio.timeout(self._poll_seconds):
                            await self._wake.wait()
                    except TimeoutError:
                        pass
            except (
                OSError, asyncpg.PostgresError, asyncpg.InterfaceError, DatabaseUnreachable
            ) as exc:
                _log.warning("state_watch_failed", error=str(exc))
                await asyncio.sleep(self._poll_seconds)
            finally:
                if conn is not None:
                    try:
                        await conn.close()
                    except (OSError, asyncpg.InterfaceError):
                        pass


class ActivityRecorder:
    """Buffers what the proxy saw (mirrored rows, unmirrored statements) for the control schema.

    The proxy's hot path only bumps in-memory counters; a background task flushes them every
    few seconds, so the report has history that survives restarts and spans every sidecar.
    """

    def __init__(self, sidecar: str) -> None:
        self.sidecar = sidecar
        self._unmirrored: dict[tuple[str, str], int] = {}
        self._activity: dict[tuple[str, str], list[int]] = {}
        #: start of the period the buffered counts cover (the last successful flush)
        self._period_start = time.time()

    def unmirrored(self, mappings: Sequence[str], reason: str) -> None:
        for mapping in mappings:
            key = (mapping, reason)
            self._unmirrored[key] = self._unmirrored.get(key, 0) + 1

    def mirrored(self, mapping: str, operation: str, rows: int, *, failed: bool = False) -> None:
        counts = self._activity.setdefault((mapping, operation), [0, 0, 0])
        counts[0] += 1
        counts[1] += rows
        counts[2] += 1 if failed else 0

    @property
    def pending(self) -> bool:
        return bool(self._unmirrored or self._activity)

    async def flush(self, conn: asyncpg.Connection) -> None:
        """Write and reset the buffered counts (kept for the next flush if the write fails)."""
        unmirrored, activity = self._unmirrored, self._activity
        if not unmirrored and not activity:
            return
        self._unmirrored, self._activity = {}, {}
        try:
            async with conn.transaction():
                if unmirrored:
                    await conn.executemany(
                        "INSERT INTO dualwrite.unmirrored_events (mapping, reason, statements, "
                        "sidecar) VALUES ($1, $2, $3, $4)",
                        [(m, r, n, self.sidecar) for (m, r), n in unmirrored.items()],
                    )
                if activity:
                    await conn.executemany(
                        "INSERT INTO dualwrite.mirror_activity (sidecar, mapping, operation, "
                        "statements, rows, failures, period_start, period_end) VALUES "
                        "($1, $2, $3, $4, $5, $6, to_timestamp($7), now())",
                        [
                            (self.sidecar, m, op, c[0], c[1], c[2], self._period_start)
                            for (m, op), c in activity.items()
                        ],
                    )
        except BaseException:
            for key, n in unmirrored.items():
                self._unmirrored[key] = self._unmirrored.get(key, 0) + n
            for key, c in activity.items():
                merged = self._activity.setdefault(key, [0, 0, 0])
                for i in range(3):
                    merged[i] += c[i]
            raise
        self._period_start = time.time()
