"""The row sources comparing reads: expected rows from the source, actual rows from the target.

The reconciler (compare/statements.py) and backfill compose these. Every row source returns
the key values as ``__k1..__kn``, whether the mapping includes the row as ``__dw_in`` and the
target column values as ``__c1..__cm`` (in ``columns`` order); on the source side those are
the expressions cast to the target's column types, i.e. what the target would hold. Keyset
bounds and key sets are jsonb parameters (one key array, or an array of key arrays);
``upto_row`` is an SQL row of typed key values instead (e.g. from sub-selects). The mapping's
expressions, filter and key JSON come from the compiled mapping, as for the rewrite and
sync_keys, so a mirror and its check read the mapping alike. On the target side only the rows
the mapping owns are read (``target_filter``): in a merge the other mapping's rows are neither
extra nor anything to repair.
"""

from __future__ import annotations

from core.mapping import SRC, TGT, CompiledMapping
from core.sqltext import quote_ident

_IN = quote_ident("__dw_in")


def key_aliases(mapping: CompiledMapping) -> list[str]:
    """Quoted output names of the key values in the row sources."""
    return [quote_ident(f"__k{i + 1}") for i in range(len(mapping.key))]


def column_aliases(mapping: CompiledMapping) -> list[str]:
    """Quoted output names of the target column values, in ``columns`` order."""
    return [quote_ident(f"__c{i + 1}") for i in range(len(mapping.columns))]


def key_bound_sql(mapping: CompiledMapping, param: str) -> str:
    """One key (a jsonb array parameter) as a row of typed values, for keyset comparisons."""
    _, _, catalog = mapping.binding()
    values = ", ".join(f"(({param})->>{i})::{typ}" for i, typ in enumerate(catalog.key_types))
    return f"({values})"


def source_rows_sql(
    mapping: CompiledMapping,
    *,
    after: str | None = None,
    upto: str | None = None,
    upto_row: str | None = None,
    limit: str | None = None,
    keys: str | None = None,
    tenant: str | None = None,
) -> str:
    """Source rows in key range (``after``, ``upto``] or key set ``keys``, filter NOT applied.

    With ``limit`` it is the first ``limit`` rows in key order. Rows the filter rejects are
    kept, with ``__dw_in`` false and NULL values (mapping expressions are evaluated only for
    included rows), so a chunk's extent does not depend on the filter. Key ranges are
    served by the source's index when the key expressions are plain indexed columns.
    """
    source, _, catalog = mapping.binding()
    conds = _conditions(mapping, "source", after, upto, upto_row, keys, tenant)
    read = "".join(f", {SRC}.{quote_ident(c)}" for c in catalog.source_columns_read)
    keys_out = ", ".join(
        f"{expr} AS {alias}"
        for expr, alias in zip(mapping.key_exprs(), key_aliases(mapping), strict=True)
    )
    order = f" ORDER BY {', '.join(mapping.key_exprs())} LIMIT {limit}" if limit else ""
    inner = (
        f"SELECT {keys_out}, {mapping.filter_sql()} AS {_IN}{read} "
        f"FROM {source.sql} AS {SRC} WHERE {conds}{order}"
    )
    values = ", ".join(
        _included_value(mapping, i) + f" AS {alias}"
        for i, alias in enumerate(column_aliases(mapping))
    )
    return f"SELECT {', '.join(key_aliases(mapping))}, {_IN}, {values} FROM ({inner}) AS {SRC}"


def target_rows_sql(
    mapping: CompiledMapping,
    *,
    after: str | None = None,
    upto: str | None = None,
    upto_row: str | None = None,
    limit: str | None = None,
    keys: str | None = None,
    tenant: str | None = None,
) -> str:
    """Target rows in key range (``after``, ``upto``] or key set ``keys`` (see the source's)."""
    _, target, _ = mapping.binding()
    key_cols = _side_keys(mapping, "target")
    conds = _conditions(mapping, "target", after, upto, upto_row, keys, tenant)
    keys_out = ", ".join(
        f"{c} AS {a}" for c, a in zip(key_cols, key_aliases(mapping), strict=True)
    )
    values = ", ".join(
        f"{TGT}.{quote_ident(c)} AS {alias}"
        for c, alias in zip(mapping.columns, column_aliases(mapping), strict=True)
    )
    order = f" ORDER BY {', '.join(key_cols)} LIMIT {limit}" if limit else ""
    return (
        f"SELECT {keys_out}, true AS {_IN}, {values} "
        f"FROM {target.sql} AS {TGT} WHERE {conds}{order}"
    )


def keys_sql(
    mapping: CompiledMapping,
    side: str,
    *,
    after: str | None = None,
    offset: str | None = None,
    last: bool = False,
    tenant: str | None = None,
) -> str:
    """The key (``__k1``..) of one row of ``side`` ('source' or 'target'), rows the filter
    rejects included: the row ``offset`` rows past ``after`` in key order, or with ``last``
    the greatest. A walk of the key index (index-only for plain key columns)."""
    source, target, _ = mapping.binding()
    table, alias = (source, SRC) if side == "source" else (target, TGT)
    keys = _side_keys(mapping, side)
    conds = _conditions(mapping, side, after, None, None, None, tenant)
    out = ", ".join(f"{k} AS {a}" for k, a in zip(keys, key_aliases(mapping), strict=True))
    order = ", ".join(f"{k} DESC" if last else k for k in keys)
    skip = f" OFFSET {offset}" if offset else ""
    return (
        f"SELECT {out} FROM {table.sql} AS {alias} WHERE {conds} "
        f"ORDER BY {order}{skip} LIMIT 1"
    )


def source_keys_sql(
    mapping: CompiledMapping,
    *,
    after: str | None = None,
    upto: str | None = None,
    limit: str | None = None,
) -> str:
    """Keys (jsonb text) of included source rows in key order within (``after``, ``upto``]."""
    source, _, _ = mapping.binding()
    conds = _conditions(mapping, "source", after, upto, None, None, None)
    order = f" ORDER BY {', '.join(mapping.key_exprs())}" + (f" LIMIT {limit}" if limit else "")
    return (
        f"SELECT {mapping.key_json_sql()}::text AS key FROM {source.sql} AS {SRC} "
        f"WHERE {mapping.filter_sql()} AND {conds}{order}"
    )


def source_last_key_sql(mapping: CompiledMapping) -> str:
    """The greatest key (jsonb text) of the source table, rows the filter rejects included."""
    return (
        f"SELECT jsonb_build_array({', '.join(key_aliases(mapping))})::text "
        f"FROM ({keys_sql(mapping, 'source', last=True)}) AS k"
    )


def _side_keys(mapping: CompiledMapping, side: str) -> list[str]:
    if side == "source":
        return mapping.key_exprs()
    return [f"{TGT}.{quote_ident(k)}" for k in mapping.key]


def _conditions(
    mapping: CompiledMapping,
    side: str,
    after: str | None,
    upto: str | None,
    upto_row: str | None,
    keys: str | None,
    tenant: str | None,
) -> str:
    key_sql = _side_keys(mapping, side)
    row = f"({', '.join(key_sql)})"
    conds = [f"{k} IS NOT NULL" for k in key_sql]
    if side == "target" and mapping.target_filter is not None:
        conds.append(mapping.owned_sql())  # rows another writer owns are not this mapping's
    if after is not None:
        conds.append(f"{row} > {key_bound_sql(mapping, after)}")
    if upto is not None:
        conds.append(f"{row} <= {key_bound_sql(mapping, upto)}")
    if upto_row is not None:
        conds.append(f"{row} <= {upto_row}")
    if keys is not None:
        conds.append(f"{row} IN ({mapping.keys_from_json_sql(keys)})")
    if tenant is not None:
        index = _tenant_index(mapping)
        value = (
            _expected_value(mapping, index) if side == "source"
            else f"{TGT}.{quote_ident(mapping.columns[index])}"
        )
        conds.append(f"{value}::text = {tenant}")
    return " AND ".join(conds)


def _expected_value(mapping: CompiledMapping, index: int) -> str:
    """The mapping expression of column ``index`` cast to the target column's type."""
    _, _, catalog = mapping.binding()
    column = mapping.columns[index]
    return f"CAST(({mapping.expressions[column].sql}) AS {catalog.target_types[index]})"


def _included_value(mapping: CompiledMapping, index: int) -> str:
    if mapping.filter is None:
        return _expected_value(mapping, index)
    return f"CASE WHEN {_IN} THEN {_expected_value(mapping, index)} END"


def _tenant_index(mapping: CompiledMapping) -> int:
    if mapping.config.tenant_column is None:
        raise RuntimeError(f"mapping {mapping.name} has no tenant_column")
    return mapping.columns.index(mapping.config.tenant_column)
