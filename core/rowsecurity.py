"""Row-level security as the service role meets it: which mapped tables it would see filtered.

The applier, repair, backfill and the reconciler read sources and targets as the service
role. Under a row-level security policy that role would see only the rows the policy lets
it see, and a row it cannot see looks deleted: the applier would delete or never write the
target row, and a pass would compare what it sees and call it clean. So validation refuses a
service role that would see a filtered view of any mapped table (:func:`filtered_view_problem`),
and every service session runs with ``row_security = off`` (:data:`SESSION_SETTINGS`), so that
a policy added after start-up makes PostgreSQL raise an error instead of hiding rows.

PostgreSQL applies a table's policies to a role unless the table has row security disabled,
the role is a superuser or has BYPASSRLS, or the role owns the table (membership counts) and
the table does not FORCE ROW LEVEL SECURITY.
"""

from __future__ import annotations

from typing import Final

import asyncpg

from core.connect import connect
from core.sqltext import QualifiedName, quote_ident

#: server settings of every service session (applier, repair, backfill, reconcile, setup)
SESSION_SETTINGS: Final = {"row_security": "off"}

_SEEN_AS = """
SELECT c.relrowsecurity AS enabled, c.relforcerowsecurity AS forced,
       r.rolsuper OR r.rolbypassrls AS bypasses,
       pg_has_role(current_user, c.relowner, 'USAGE') AS owns,
       current_user::text AS role
FROM pg_class c CROSS JOIN pg_roles r
WHERE c.oid = $1::regclass AND r.rolname = current_user
"""


def applies(*, enabled: bool, forced: bool, bypasses: bool, owns: bool) -> bool:
    """Whether a table's policies filter what a role sees (PostgreSQL's check_enable_rls)."""
    if not enabled or bypasses:
        return False
    return forced or not owns


async def filtered_view_problem(
    conn: asyncpg.Connection, table: QualifiedName, what: str
) -> str | None:
    """Why this session's role would see ``table`` through row-level security (None: it
    sees every row). ``what`` names the table's part ("source", "target") in the message."""
    row = await conn.fetchrow(_SEEN_AS, table.sql)
    if row is None or not applies(
        enabled=row["enabled"], forced=row["forced"], bypasses=row["bypasses"], owns=row["owns"]
    ):
        return None
    role = row["role"]
    why = (
        "forces row-level security (FORCE ROW LEVEL SECURITY), which applies even to its owner"
        if row["owns"]
        else "has row-level security enabled"
    )
    return (
        f"{what} {table} {why}: the service role {role} would see only the rows its policies "
        "allow, and could take a hidden row for a deleted one. Give the role BYPASSRLS "
        f"(ALTER ROLE {quote_ident(role)} BYPASSRLS), or make it the owner of {table} "
        "without FORCE ROW LEVEL SECURITY"
    )


async def connect_unfiltered(dsn: str) -> asyncpg.Connection:
    """A service session in ``dsn``'s database with :data:`SESSION_SETTINGS` (a failure to
    connect is core/connect.py's one-line error)."""
    return await connect(dsn, server_settings=dict(SESSION_SETTINGS))
