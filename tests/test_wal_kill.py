"""The WAL reader loses nothing: kill -9 of the reading sidecar mid-stream (a standby sidecar
takes over), and an immediate (crash) restart of PostgreSQL, both under write load. Every
acknowledged write is in the target afterwards, and the slot survives."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import psycopg
from conftest import LOGICAL_SETTINGS
from support import PgServer, deep_merge, free_port, pos, start_in_process, wait_until, wal

from dualwrite.embedded import EmbeddedPostgres


class Load:
    """Direct-connection writers (around any sidecar) that record what was acknowledged and
    retry through connection failures (a restarting server)."""

    def __init__(self, dsn: str, threads: int = 3) -> None:
        self.dsn = dsn
        self.acknowledged: set[int] = set()
        self.deleted: set[int] = set()
        #: deletes sent, acknowledged or not: a crash between commit and reply leaves the
        #: row's fate unknown to the client (either is right, as long as target = source)
        self.deleting: set[int] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._write, args=(i,)) for i in range(threads)]
        self.errors: list[BaseException] = []

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def count(self) -> int:
        with self._lock:
            return len(self.acknowledged)

    def _write(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
                    while not self._stop.is_set():
                        n += 1
                        new = conn.execute(
                            "INSERT INTO audit_log (tenant_id, action, entity, entity_id) "
                            "VALUES (%s, 'load', 'kill', %s) RETURNING id",
                            (1 + i % 3, n),
                        ).fetchone()[0]
                        with self._lock:
                            self.acknowledged.add(new)
                        if n % 5 == 0:
                            conn.execute(
                                "UPDATE audit_log SET details = '{\"n\": 1}' WHERE id = %s", (new,)
                            )
                        if n % 7 == 0:
                            with self._lock:
                                self.deleting.add(new)
                            conn.execute("DELETE FROM audit_log WHERE id = %s", (new,))
                            with self._lock:
                                self.deleted.add(new)
            except psycopg.OperationalError:
                self._stop.wait(0.1)  # the server is restarting: connect again
            except BaseException as exc:
                self.errors.append(exc)
                return


def _reader_pid(db) -> int | None:
    reader = db.scalar("SELECT reader FROM dualwrite.wal_progress")
    return None if reader is None else int(reader.rpartition(":")[2])


def _assert_target_has_every_acknowledged_write(db, load: Load) -> None:
    assert not load.errors, load.errors
    assert pos.divergence(db, [wal.MAPPING]) == {}
    kept = load.acknowledged - load.deleting
    in_target = {r[0] for r in db.sql("SELECT id FROM v2.audit_events")}
    assert kept <= in_target
    assert not (load.deleted & in_target)


def test_kill_9_of_the_reader_mid_stream_loses_nothing_and_a_standby_takes_over(
    logical_db, logical_sidecar_process
):
    db = logical_db
    slot = db.name
    config = wal.migration("wal", slot)
    wal.prepare(db, config)
    first = logical_sidecar_process(config)
    second = logical_sidecar_process(config)
    with Load(db.dsn) as load:
        wait_until(lambda: load.count() > 200, timeout=60, what="load before the kill")
        leader = wait_until(lambda: _reader_pid(db), timeout=30, what="a reader to lead")
        victim = first if first.pid == leader else second
        assert victim.pid == leader
        victim.kill()  # SIGKILL: no shutdown, no release, mid-stream
        victim.wait()
        assert victim.returncode == -signal.SIGKILL
        written = load.count()
        wait_until(lambda: load.count() > written + 200, timeout=60, what="load after the kill")
        wait_until(
            lambda: _reader_pid(db) not in (None, leader), timeout=60, what="the standby to lead"
        )
    wal.wait_applied(db, slot)
    _assert_target_has_every_acknowledged_write(db, load)
    assert db.scalar("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", slot) == 1


def test_a_postgresql_crash_restart_under_load_loses_nothing():
    port = free_port()
    # a data directory that survives the restart, where the unprivileged server user can reach
    # it when the tests run as root (pytest's tmp_path is private to root)
    root = Path(tempfile.mkdtemp(prefix="dualwrite-pg-"))
    # synchronous commits: an acknowledged write must survive the crash in the source itself
    cluster = EmbeddedPostgres(
        root / "data", port=port, settings={**LOGICAL_SETTINGS, "synchronous_commit": "on"}
    )
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, root, ignore_errors=True)
        cleanup.enter_context(cluster)
        server = PgServer.from_embedded(cluster)
        db = server.create_database()
        slot = db.name
        config = wal.migration("wal", slot)
        wal.prepare(db, config)
        handle = start_in_process(
            deep_merge(
                {
                    "listen": {"host": "127.0.0.1"},
                    "upstream": {"host": server.host, "port": server.port},
                    "service_dsn": db.dsn,
                    "admin": {"host": "127.0.0.1", "port": 0},
                },
                config,
            ),
            dbname=db.name,
            user=server.user,
            password=None,
        )
        try:
            with Load(db.dsn) as load:
                wait_until(lambda: load.count() > 200, timeout=60, what="load before the crash")
                db.close()
                pid = cluster.pid
                assert pid is not None
                os.kill(pid, signal.SIGQUIT)  # immediate shutdown: no checkpoint, a crash
                wait_until(lambda: not cluster.running, timeout=30, what="the crash")
                cluster.start()
                written = load.count()
                wait_until(
                    lambda: load.count() > written + 200, timeout=60, what="load after restart"
                )
            wal.wait_applied(db, slot, timeout=120)
            _assert_target_has_every_acknowledged_write(db, load)
            assert db.scalar(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", slot
            ) == 1
        finally:
            handle.stop(grace=0)
            db.close()


def test_dualwrite_apply_reads_the_wal_without_a_proxy_and_a_kill_9_loses_nothing(
    logical_db, tmp_path
):
    """``capture: wal`` needs no proxy: ``dualwrite apply`` alone reads the slot and applies.
    Killed -9 under load and started again, it re-reads from the slot; nothing is missing."""
    db = logical_db
    slot = db.name
    config = wal.migration("wal", slot)
    wal.prepare(db, config)
    applier = pos.ApplierProcess(db, config, tmp_path / "first").start()
    try:
        with Load(db.dsn) as load:
            wait_until(lambda: load.count() > 200, timeout=60, what="load before the kill")
            first = applier.proc.pid if applier.proc else None
            wait_until(lambda: _reader_pid(db) == first, timeout=60, what="apply to read")
            assert applier.kill() == -signal.SIGKILL, applier.output()
            written = load.count()
            applier = pos.ApplierProcess(db, config, tmp_path / "second").start()
            wait_until(lambda: load.count() > written + 200, timeout=60, what="load after")
            second = applier.proc.pid if applier.proc else None
            wait_until(lambda: _reader_pid(db) == second, timeout=60, what="the restart to read")
        wal.wait_applied(db, slot)
        _assert_target_has_every_acknowledged_write(db, load)
        assert db.scalar(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", slot
        ) == 1
    finally:
        applier.stop()
