"""The PostgreSQL server the tests run against, and the fresh database each test gets."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import conninfo_to_dict

from dualwrite.embedded import EmbeddedPostgres

from .procs import client_bin_dir

Query = str | pgsql.Composable


def _run(dsn: str, query: Query, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return _execute(conn, query, args)


def _execute(
    conn: psycopg.Connection[Any], query: Query, args: tuple[Any, ...]
) -> list[tuple[Any, ...]]:
    # no args -> no placeholder processing, so a literal % in the SQL is just a %
    cur = conn.execute(query, args or None)
    while True:  # several statements (no args): keep the last one's rows
        rows = cur.fetchall() if cur.description is not None else []
        if not cur.nextset():
            return rows


@dataclass
class PgServer:
    """Where the tests' PostgreSQL is: ``DUALWRITE_TEST_DSN``'s server or an embedded one."""

    host: str
    port: int
    user: str = "postgres"
    password: str | None = None
    #: directory holding psql and pgbench (PATH's, else the embedded wheel's)
    bin_dir: Path = field(default_factory=client_bin_dir)
    #: the cluster the harness started, None when DUALWRITE_TEST_DSN named a server
    embedded: EmbeddedPostgres | None = None

    @classmethod
    def from_dsn(cls, dsn: str) -> PgServer:
        parts = conninfo_to_dict(dsn)
        host = str(parts.get("host") or parts.get("hostaddr") or "127.0.0.1")
        if host.startswith("/"):
            raise ValueError("DUALWRITE_TEST_DSN must name a TCP host: the sidecar relays over TCP")
        return cls(
            host=host,
            port=int(parts.get("port") or 5432),
            user=str(parts.get("user") or "postgres"),
            password=str(parts["password"]) if parts.get("password") else None,
        )

    @classmethod
    def from_embedded(cls, cluster: EmbeddedPostgres) -> PgServer:
        return cls(host=cluster.host, port=cluster.port, user=cluster.user, embedded=cluster)

    def dsn(
        self, dbname: str = "postgres", *, user: str | None = None, password: str | None = None
    ) -> str:
        """A URL to ``dbname``; the server's own password is used only for its own user."""
        who = user or self.user
        secret = password if password is not None else (self.password if who == self.user else None)
        auth = quote(who, safe="") + (":" + quote(secret, safe="") if secret else "")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    @property
    def admin_dsn(self) -> str:
        return self.dsn("postgres")

    def sql(self, query: Query, *args: Any) -> list[tuple[Any, ...]]:
        """Run one query in the ``postgres`` database (autocommit) and return its rows."""
        return _run(self.admin_dsn, query, args)

    def server_version_num(self) -> int:
        return int(self.sql("SHOW server_version_num")[0][0])

    def create_database(self, prefix: str = "dwtest") -> Database:
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        create = pgsql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8'")
        self.sql(create.format(pgsql.Identifier(name)))
        return Database(name=name, server=self)

    def drop_database(self, name: str) -> None:
        self.sql(
            pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name))
        )


@dataclass
class Database:
    """A database of one test's own: ``db.sql("SELECT ...", arg)`` returns rows as tuples."""

    name: str
    server: PgServer
    _conn: psycopg.Connection[Any] | None = field(default=None, repr=False)

    @property
    def dsn(self) -> str:
        return self.server.dsn(self.name)

    def dsn_as(self, user: str, password: str | None = None) -> str:
        return self.server.dsn(self.name, user=user, password=password)

    def connect(self, *, autocommit: bool = True, **kwargs: Any) -> psycopg.Connection[Any]:
        """A new psycopg connection to this database; the caller closes it."""
        return psycopg.connect(self.dsn, autocommit=autocommit, **kwargs)

    def sql(self, query: Query, *args: Any) -> list[tuple[Any, ...]]:
        """Run SQL (``%s`` placeholders for ``args``) on a shared autocommit connection.

        Several statements in one string run as one simple query when no args are given;
        the rows of the last one are returned ([] for statements that return none).
        """
        if self._conn is None or self._conn.closed:
            self._conn = self.connect()
        return _execute(self._conn, query, args)

    def scalar(self, query: Query, *args: Any) -> Any:
        """The first column of the first row (None when there are no rows)."""
        rows = self.sql(query, *args)
        return rows[0][0] if rows else None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def drop(self) -> None:
        self.close()
        self.server.drop_database(self.name)
