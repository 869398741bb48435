"""core/sqllex.py against the server's own scanner: a respelled text gives what the original
gave under its setting, under either setting; texts it calls alike give the same under both."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from core.sqllex import Unlexable, lexes_alike, neutral_text

TEXTS = [
    "SELECT 'a\\'\n' AS one, 'x' AS two -- '",
    "SELECT 'tab\\there', 'two\\\\', 'quote''s \\' || '\\'",
    "SELECT N'n\\'t', E'e\\'s', B'0101', X'1F', $q$dollar \\' $q$, $$\\$$",
    "SELECT 'seg\\'\n  -- comment\n  'ment', U&\"\\0061\" FROM (SELECT 1 AS a) AS t",
    "SELECT /* 'c\\' /* nested */ */ 'after\\'\n' AS x -- '",
    'SELECT 1 AS "col\\", \'v\\\\w\' AS "q""\'"',
    "SELECT 'no backslash', $1::text IS NULL",
]


def run(conn: psycopg.Connection[Any], standard: bool, text: str) -> Any:
    conn.execute(f"SET standard_conforming_strings = {'on' if standard else 'off'}")
    cursor = psycopg.ClientCursor(conn)
    try:
        cursor.execute(text.replace("$1::text", "NULL::text"))
    except psycopg.Error as exc:
        return type(exc).__name__
    return cursor.fetchall()


@pytest.mark.parametrize("text", TEXTS)
def test_respelled_text_means_what_the_server_read(db, text):
    with db.connect() as conn:
        conn.execute("SET escape_string_warning = off")
        for standard in (True, False):
            expected = run(conn, standard, text)
            try:
                respelled = neutral_text(text, standard_conforming_strings=standard)
            except Unlexable:
                assert isinstance(expected, str)  # the server's scanner failed too
                continue
            spelled = respelled.text if respelled is not None else text
            assert run(conn, True, spelled) == expected
            assert run(conn, False, spelled) == expected
            if respelled is not None:
                inserted = {i for at, n in respelled.insertions for i in range(at, at + n)}
                kept = "".join(c for i, c in enumerate(respelled.text) if i not in inserted)
                assert kept == text  # only insertions


@pytest.mark.parametrize("text", TEXTS)
def test_texts_called_alike_read_the_same_under_both_settings(db, text):
    with db.connect() as conn:
        conn.execute("SET escape_string_warning = off")
        if lexes_alike(text):
            assert run(conn, True, text) == run(conn, False, text)
        else:
            assert run(conn, True, text) != run(conn, False, text)
