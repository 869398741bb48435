"""Mirror modes: what ``sync`` and ``outbox`` mean for the rewrite, key sync, grants and validation.

A mapping's mode answers one question: does the application's own statement write the target
(``sync``), or does it only capture the keys it touched in the outbox, for the applier to copy
later (``outbox``)? Everything else that differs between the modes follows from that answer,
and is stated here once, as a property of :class:`MirrorMode`, so that no other module compares
mode names.

The mode is one axis of how a mapping is mirrored. A second one (how changes are captured:
from statements, from WAL, or both) would be an enum of its own beside this one; facts that
depend on both axes would then belong to a small value holding the pair, not to either enum.
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
