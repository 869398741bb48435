"""The SQL ``sync_keys`` runs: read the source rows of some keys, lock rows, write the target.

A mapping with ``target_filter`` deletes (and overwrites) only target rows it owns.

Built from the compiled mapping's shared fragments (expected rows, key JSON, the upsert), so
the applier, repair and backfill write the target exactly as the rewrite would. Keys arrive
as a jsonb array of key arrays (``keys_param``); see mirror/keysync.py for the locking
discipline these statements serve.
"""

from __future__ import annotations

from core.catalog import Prepared
from core.mapping import SRC, TGT, CompiledMapping, compile_mapping
from core.sqltext import quote_ident


def source_rows_for_keys_sql(mapping: CompiledMapping, keys_param: str) -> str:
    """Mapped rows of the source rows whose key is in the jsonb array ``keys_param``.

    Each row carries its key as ``__dw_key`` (jsonb) so callers can tell found from missing.
    """
    source, _, _ = mapping.binding()
    key_row = ", ".join(mapping.key_exprs())
    return (
        f"SELECT {mapping.key_json_sql()} AS __dw_key, {mapping.select_list()} "
        f"FROM {source.sql} AS {SRC} WHERE {mapping.filter_sql()} "
        f"AND ({key_row}) IN ({mapping.keys_from_json_sql(keys_param)})"
    )


def lock_source_rows_sql(mapping: CompiledMapping, keys_param: str) -> str:
    """Share-lock the source rows of these keys, in key order (sync-mode ordering)."""
    source, _, _ = mapping.binding()
    key_row = ", ".join(mapping.key_exprs())
    return (
        f"SELECT 1 FROM {source.sql} AS {SRC} WHERE ({key_row}) IN "
        f"({mapping.keys_from_json_sql(keys_param)}) ORDER BY {key_row} FOR SHARE"
    )


def lock_target_rows_sql(mapping: CompiledMapping, keys_param: str) -> str:
    """Lock existing target rows of these keys, in key order; return their keys as jsonb."""
    _, target, _ = mapping.binding()
    key_row = mapping.target_key_list(TGT)
    return (
        f"SELECT jsonb_build_array({key_row}) AS __dw_key FROM {target.sql} AS {TGT} "
        f"WHERE ({key_row}) IN ({mapping.keys_from_json_sql(keys_param)}) "
        f"ORDER BY {key_row} FOR UPDATE"
    )


def apply_keys_sql(mapping: CompiledMapping, keys_param: str, locked_param: str | None) -> str:
    """One statement that makes the target rows of these keys match the source.

    Returns ``(upserted, deleted)``. With ``locked_param`` (sync-mode discipline: the
    target rows that existed were locked first), keys whose target row did not exist are
    inserted with DO NOTHING: a row that appeared meanwhile was written by a sync-mode
    statement that saw newer source state.
    """
    _, target, _ = mapping.binding()
    source_rows = source_rows_for_keys_sql(mapping, keys_param)
    existing = f"SELECT {', '.join(f'e.{quote_ident(c)}' for c in mapping.columns)} FROM e"
    if locked_param is None:
        upserts = f"up AS ({mapping.upsert_sql(existing)} RETURNING 1)"
    else:
        locked = f"(SELECT value FROM jsonb_array_elements({locked_param}))"
        upserts = (
            f"up AS ({mapping.upsert_sql(f'{existing} WHERE e.__dw_key IN {locked}')} "
            "RETURNING 1), "
            f"ins AS (INSERT INTO {target.sql} AS {TGT} ({mapping.target_column_list()}) "
            f"{existing} WHERE e.__dw_key NOT IN {locked} "
            f"ON CONFLICT ({mapping.target_key_list()}) DO NOTHING RETURNING 1)"
        )
    key_row = mapping.target_key_list(TGT)
    # Only keys without an expected row are looked up in the target: when every source
    # row is there (the common case) the delete probes nothing.
    names = mapping.key_tuple_names()
    gone = (
        f"del AS (DELETE FROM {target.sql} AS {TGT} WHERE ({key_row}) "
        f"IN (SELECT {names} FROM ({mapping.keys_from_json_sql(keys_param)}) AS g "
        f"WHERE jsonb_build_array({names}) NOT IN (SELECT __dw_key FROM e)) "
        f"AND {mapping.owned_sql()} RETURNING 1)"
    )
    inserted = "(SELECT count(*) FROM up)" + (
        " + (SELECT count(*) FROM ins)" if locked_param is not None else ""
    )
    return (
        f"WITH e AS ({source_rows}), {upserts}, {gone} "
        f"SELECT {inserted} AS upserted, (SELECT count(*) FROM del) AS deleted"
    )


def other_phase_sql(mapping: CompiledMapping, keys_param: str) -> str | None:
    """Staged cutover: one key (jsonb text) of these whose source or target row the mapping
    would carry but for the cutover (its own filter or target_filter holds, the narrowed one
    does not): a row of a tenant in the other phase, which only a process with another
    cutover config can have captured. None when the mapping's cutover narrows nothing."""
    role = mapping.cutover
    if role is None or (role.direction == "forward" and not role.tenants):
        return None
    source, target, _ = mapping.binding()
    plain = compile_mapping(mapping.config)
    keys = mapping.keys_from_json_sql(keys_param)
    return (
        f"SELECT {mapping.key_json_sql()}::pg_catalog.text FROM {source.sql} AS {SRC} "
        f"WHERE ({', '.join(mapping.key_exprs())}) IN ({keys}) "
        f"AND {plain.filter_sql()} AND NOT {mapping.filter_sql()} "
        f"UNION ALL SELECT pg_catalog.jsonb_build_array({mapping.target_key_list(TGT)})::"
        f"pg_catalog.text FROM {target.sql} AS {TGT} "
        f"WHERE ({mapping.target_key_list(TGT)}) IN ({keys}) "
        f"AND {plain.owned_sql()} AND NOT {mapping.owned_sql()} LIMIT 1"
    )


# --- across databases (``target_dsn``) -------------------------------------------------------


def source_rows_json_sql(mapping: CompiledMapping, keys_param: str) -> str:
    """The mapped source rows of these keys as one jsonb array (to carry to another db)."""
    return (
        "SELECT coalesce(jsonb_agg(to_jsonb(r)), '[]'::jsonb) FROM ("
        f"{source_rows_for_keys_sql(mapping, keys_param)}) AS r"
    )


def apply_rows_sql(mapping: CompiledMapping, rows_param: str, keys_param: str) -> str:
    """Make the target rows of these keys equal to the given mapped rows (jsonb array).

    Keys without a row are deleted. Runs in the target's database; returns
    ``(upserted, deleted)``.
    """
    _, target, catalog = mapping.binding()
    record = ", ".join(
        f"{quote_ident(c)} {t}"
        for c, t in zip(mapping.columns, catalog.target_types, strict=True)
    )
    key_row = mapping.target_key_list(TGT)
    return (
        f"WITH e AS (SELECT * FROM jsonb_to_recordset({rows_param}) "
        f"AS r(__dw_key jsonb, {record})), "
        f"up AS ({mapping.upsert_sql(f'SELECT {mapping.target_column_list()} FROM e')} "
        "RETURNING 1), "
        f"del AS (DELETE FROM {target.sql} AS {TGT} WHERE ({key_row}) IN "
        f"({mapping.keys_from_json_sql(keys_param)}) AND jsonb_build_array({key_row}) "
        f"NOT IN (SELECT __dw_key FROM e) AND {mapping.owned_sql()} RETURNING 1) "
        "SELECT (SELECT count(*) FROM up) AS upserted, (SELECT count(*) FROM del) AS deleted"
    )


def statements_to_prepare(mapping: CompiledMapping) -> list[Prepared]:
    """What sync_keys runs for this mapping, for validation to prepare at start."""
    if mapping.cross_database:
        return [
            Prepared("read source rows", source_rows_json_sql(mapping, "$1::jsonb")),
            Prepared(
                "apply rows to target",
                apply_rows_sql(mapping, "$1::jsonb", "$2::jsonb"),
                in_target=True,
            ),
        ]
    checks = [
        Prepared("apply keys", apply_keys_sql(mapping, "$1::jsonb", None)),
        Prepared("apply keys (locked)", apply_keys_sql(mapping, "$1::jsonb", "$2::jsonb")),
    ]
    other_phase = other_phase_sql(mapping, "$1::jsonb")
    if other_phase is not None:
        checks.append(Prepared("cutover: keys of the other phase", other_phase))
    return checks
