"""Per-column comparison forms: tolerance rules and canonical text, as SQL applied to both sides.

A value is compared in its *normalised* form: the column's tolerance rules (config
``compare.tolerances``) applied in a fixed order, and types without a usable equality made
comparable (json as jsonb; xml and geometric types as text). Across databases values are
hashed from their *canonical text*, which also folds encodings that compare equal but print
differently (-0 and 0 in floats, 1.0 and 1.00 in numerics); chunk hashes use the equivalent
*canonical bytes*, which are cheaper to build.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from core.config import ToleranceRule
from core.sqltext import quote_literal

_TYPMOD = re.compile(r"\([^)]*\)")
_FLOATS = frozenset({"real", "double precision"})
_AS_TEXT = frozenset({"xml", "point", "line", "lseg", "box", "path", "polygon", "circle"})
#: binary send functions whose output is fixed-width or carries its own length, and does not
#: depend on session settings (timestamps are microseconds since 2000-01-01 UTC)
_SEND = {
    "smallint": "int2send",
    "integer": "int4send",
    "bigint": "int8send",
    "boolean": "boolsend",
    "real": "float4send",
    "double precision": "float8send",
    "numeric": "numeric_send",
    "date": "date_send",
    "time without time zone": "time_send",
    "timestamp without time zone": "timestamp_send",
    "timestamp with time zone": "timestamptz_send",
    "uuid": "uuid_send",
}
_TIMESTAMP_UNITS = {
    "second": "second",
    "millisecond": "milliseconds",
    "minute": "minute",
    "hour": "hour",
    "day": "day",
}


def base_type(sql_type: str) -> str:
    """``numeric(10,2)`` -> ``numeric``; ``character(5)[]`` -> ``character[]``."""
    return _TYPMOD.sub("", sql_type).strip()


@dataclass(frozen=True)
class ColumnForm:
    """How one target column is compared: its normalised SQL and its canonical text."""

    rule: ToleranceRule | None
    sql_type: str

    def normalised(self, ref: str) -> str:
        """``ref`` (a column reference of this type) in the form both sides are compared in."""
        value, kind = ref, base_type(self.sql_type)
        if kind == "json":
            value, kind = f"({value})::jsonb", "jsonb"
        elif kind in _AS_TEXT:
            value, kind = f"({value})::text", "text"
        rule = self.rule
        if rule is None:
            return value
        if rule.numeric_scale is not None:
            value = f"round(({value})::numeric, {int(rule.numeric_scale)})"
        if rule.timestamp_precision is not None:
            unit = quote_literal(_TIMESTAMP_UNITS[rule.timestamp_precision])
            value = f"date_trunc({unit}, {value})"
        if rule.ignore_trailing_spaces:
            value = f"rtrim(({value})::text, ' ')"
        if rule.case_insensitive:
            value = f"lower(({value})::text)"
        if rule.null_equals_empty:
            value = f"nullif(({value})::text, '')"
        return value

    def canonical_text(self, ref: str) -> str:
        """The normalised value as text that is equal exactly when the values compare equal."""
        return f"({self._one_spelling(ref)})::text"

    def _one_spelling(self, ref: str) -> str:
        """The normalised value, with encodings that compare equal folded into one."""
        value, kind = self.normalised(ref), self._result_type()
        if kind in _FLOATS:
            return f"(({value}) + 0)"  # -0 + 0 is +0: one spelling for both zeros
        if kind == "numeric":
            return f"trim_scale({value})"
        if kind == "interval":
            # '1 day' = '24 hours' and '1 mon' = '30 days' (interval_eq): one spelling
            return f"justify_interval({value})"
        return value

    def canonical_bytes(self, ref: str) -> str:
        """The normalised value as self-delimiting bytes, equal exactly when the canonical
        texts are: the type's binary send form where it is fixed-width or self-delimiting and
        independent of session settings, else the canonical text with a length prefix; NULL
        is one zero byte. For chunk hashes: building these costs about half of building the
        row text (measured on bigint, integer, numeric, text, timestamptz and uuid columns).
        """
        send = _SEND.get(self._result_type())
        if send is None:
            text = self.canonical_text(ref)
            return (
                f"coalesce('\\x01'::bytea || int4send(octet_length({text})) "
                f"|| textsend({text}), '\\x00'::bytea)"
            )
        return f"coalesce('\\x01'::bytea || {send}({self._one_spelling(ref)}), '\\x00'::bytea)"

    def _result_type(self) -> str:
        rule = self.rule
        if rule is not None and (
            rule.ignore_trailing_spaces or rule.case_insensitive or rule.null_equals_empty
        ):
            return "text"
        if rule is not None and rule.numeric_scale is not None:
            return "numeric"
        return base_type(self.sql_type)


def column_forms(
    columns: Sequence[str], target_types: Sequence[str], rules: Sequence[ToleranceRule]
) -> list[ColumnForm]:
    """One form per target column (a column without a rule is compared as is)."""
    by_column: dict[str, ToleranceRule] = {}
    for rule in rules:
        by_column[rule.column] = _merge(by_column.get(rule.column), rule)
    return [ColumnForm(by_column.get(c), t) for c, t in zip(columns, target_types, strict=True)]


def _merge(first: ToleranceRule | None, second: ToleranceRule) -> ToleranceRule:
    """Two rules for one column act as one: flags add up, the later scale or unit wins."""
    if first is None:
        return second
    return ToleranceRule(
        column=second.column,
        numeric_scale=second.numeric_scale
        if second.numeric_scale is not None
        else first.numeric_scale,
        timestamp_precision=second.timestamp_precision or first.timestamp_precision,
        null_equals_empty=first.null_equals_empty or second.null_equals_empty,
        case_insensitive=first.case_insensitive or second.case_insensitive,
        ignore_trailing_spaces=first.ignore_trailing_spaces or second.ignore_trailing_spaces,
    )
