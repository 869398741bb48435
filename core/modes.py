"""Mirror modes and capture: what ``sync``/``outbox`` and ``statement``/``wal``/``both`` mean for
the rewrite, key sync, grants and validation.

A mapping's mode answers one question: does the application's own statement write the target
(``sync``), or does it only capture the keys it touched in the outbox, for the applier to copy
later (``outbox``)? Everything else that differs between the modes follows from that answer,
and is stated here once, as a property of :class:`MirrorMode`, so that no other module compares
mode names.

The mode is one axis of how a mapping is mirrored. The second one, :class:`Capture`, says where
changes are captured: from the statements the proxy sees, from the WAL (logical decoding), or
both. Which pairs are valid is :func:`capture_problem`'s answer, stated once here.
"""

from __future__ import annotations

from enum import StrEnum


class MirrorMode(StrEnum):
    """How a mapping's writes reach the target. A ``StrEnum``: YAML, JSON and logs show the
    plain value (``"sync"``/``"outbox"``)."""

    #: the rewritten statement upserts and deletes the target rows itself, atomically
    SYNC = "sync"
    #: the rewritten statement inserts the keys into ``dualwrite.outbox``; the applier copies
    #: the rows to the target afterwards
    OUTBOX = "outbox"

    @property
    def statement_writes_target(self) -> bool:
        """The rewritten application statement writes the target itself (else it captures the
        keys in the outbox). A paused mapping captures in the outbox whatever its mode."""
        return self is MirrorMode.SYNC

    @property
    def key_sync_locks_rows(self) -> bool:
        """``sync_keys`` must lock the source rows, then the target rows, before it writes.

        Why: in sync mode application statements write the target too, so sync_keys has a
        concurrent writer its advisory lock does not stop; locking the rows orders the two
        (see mirror/keysync.py). In outbox mode sync_keys is the target's only writer and
        application transactions never wait on it.
        """
        return self.statement_writes_target

    @property
    def app_role_writes_target(self) -> bool:
        """``setup`` grants the application role SELECT, INSERT, UPDATE, DELETE on the target.

        Why: a rewritten statement runs as the application's own role, so in sync mode that
        role writes the target. In outbox mode the applier writes it as the service role.
        """
        return self.statement_writes_target

    @property
    def needs_delete_function(self) -> bool:
        """Validation requires the per-mapping delete function that ``setup`` creates.

        Why: a statement that writes the target deletes target rows through that function (a
        DELETE in the statement's own WITH list cannot see rows committed after its snapshot;
        see core/control.py). Outbox mode deletes through sync_keys and never calls it.
        """
        return self.statement_writes_target

    @property
    def allows_target_dsn(self) -> bool:
        """The target may live in another database (``target_dsn``).

        Why: one statement cannot write another database, so a target elsewhere can only be
        reached by the applier, i.e. in outbox mode.
        """
        return not self.statement_writes_target


class Capture(StrEnum):
    """Where a mapping's changes are captured. A ``StrEnum`` like :class:`MirrorMode`."""

    #: the proxy rewrites the mapped writes it sees (the mode decides into what)
    STATEMENT = "statement"
    #: the proxy relays the mapped writes untouched; the WAL reader turns every committed
    #: change of the source table into outbox keys, whatever path wrote it
    WAL = "wal"
    #: statement capture as usual, and the WAL reader as a completeness auditor: a committed
    #: change statement capture did not record is counted, recorded and queued
    BOTH = "both"

    @property
    def rewrites_statements(self) -> bool:
        """The proxy rewrites this mapping's writes (else it relays them untouched).

        Why: with ``wal`` the log is the capture, so the application's statement must cost
        nothing extra; rewriting it as well would capture every key twice.
        """
        return self is not Capture.WAL

    @property
    def reads_wal(self) -> bool:
        """The WAL reader decodes this mapping's source table (publication, slot, reader)."""
        return self is not Capture.STATEMENT

    @property
    def audits_statement_capture(self) -> bool:
        """The reader compares the WAL with what statement capture recorded, and counts,
        records and queues each committed change it missed (``dualwrite_uncaptured_changes``).
        Why only here: with ``wal`` there is no statement capture to audit, every change is
        the reader's to queue."""
        return self is Capture.BOTH

    @property
    def needs_replica_identity(self) -> bool:
        """Validation requires the source's replica identity to contain every column the key
        is computed from. Why: a DELETE's WAL record carries only the replica identity, and
        the reader must derive the deleted row's key from it."""
        return self.reads_wal


def capture_problem(mode: MirrorMode, capture: Capture) -> str | None:
    """Why ``capture`` cannot be combined with ``mode`` (None: it can).

    The WAL reader queues keys in the outbox, so it needs ``outbox`` mode. ``both`` audits the
    outbox capture by matching the outbox rows of each transaction against its WAL changes, so
    it needs ``outbox`` mode too (a sync statement leaves no per-key mark in the WAL).
    """
    if capture.reads_wal and mode.statement_writes_target:
        return f"capture {capture} queues keys in the outbox; use mode outbox"
    return None
