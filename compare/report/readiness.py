"""Contract readiness: the old relations and columns application traffic still references."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

from compare.report.model import ContractReadiness
from core.config import MappingConfig
from core.sqltext import parse_relation_name
from core.traffic import read_evidence


async def read_readiness(
    conn: asyncpg.Connection,
    mappings: Sequence[MappingConfig],
    since: datetime,
    search_path: Sequence[str],
) -> list[ContractReadiness]:
    """For each mapping's source: the statements that referenced it since ``since``."""
    evidence = await read_evidence(conn, since)
    gaps = tuple(evidence.gaps)
    found = []
    for mapping in mappings:
        schema, name = parse_relation_name(mapping.source)
        users = list(evidence.referencing(schema, name, None, schemas=search_path))
        columns: dict[str, datetime] = {}
        for statement in users:
            for ref in statement.references:
                if ref.relation != name:
                    continue
                for column in ref.columns:
                    seen = columns.get(column, statement.last_seen)
                    columns[column] = max(seen, statement.last_seen)
        found.append(
            ContractReadiness(
                mapping=mapping.name,
                relation=mapping.source,
                statements=len(users),
                first_seen=min((u.first_seen for u in users), default=None),
                last_seen=max((u.last_seen for u in users), default=None),
                columns=dict(sorted(columns.items())),
                gaps=gaps,
            )
        )
    return found
