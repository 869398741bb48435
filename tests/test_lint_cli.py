"""``dualwrite lint`` as an operator uses it: exit codes, output formats, psql scripts, line
numbers, disabling rules, and the careless inputs (missing files, typos, broken SQL)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.lint import lint_text, rules_of, run_cli, write_config

from lint.script import parse_script

CLEAN = """-- description: add a nickname to users
-- strategy: expand
-- rollback: ALTER TABLE users DROP COLUMN IF EXISTS nickname;
SET lock_timeout = '2s';
SET statement_timeout = '60s';
ALTER TABLE users ADD COLUMN IF NOT EXISTS nickname text;
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'users'::regclass
                   AND attname = 'nickname') THEN
        RAISE EXCEPTION 'nickname is missing';
    END IF;
END $$;
"""

BAD = """-- description: index phones
-- strategy: expand
-- rollback: DROP INDEX IF EXISTS users_phone;
SET lock_timeout = '2s';
SET statement_timeout = '60s';

CREATE INDEX IF NOT EXISTS users_phone ON users (phone);
ALTER TABLE users ADD COLUMN IF NOT EXISTS preferences json;
DO $$ BEGIN ASSERT true; END $$;
"""


def write(tmp_path: Path, text: str, name: str = "m.sql") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_clean_script_exits_0_with_no_findings(tmp_path: Path) -> None:
    code, out, err = run_cli(write(tmp_path, CLEAN))
    assert (code, err) == (0, "")
    assert "0 errors, 0 warnings, 0 notes" in out


def test_findings_name_rule_file_line_why_and_fix_and_exit_1(tmp_path: Path) -> None:
    path = write(tmp_path, BAD)
    code, out, _ = run_cli(path)
    assert code == 1
    assert f"{path}:7: error [require-concurrent-index-creation]" in out
    assert f"{path}:8: warning [prefer-jsonb]" in out
    assert "    why: " in out
    assert "    fix: " in out


def test_fail_on_decides_the_exit_code(tmp_path: Path) -> None:
    path = write(tmp_path, BAD.replace("CREATE INDEX IF", "CREATE INDEX CONCURRENTLY IF"))
    assert run_cli(path)[0] == 0  # only a warning left
    assert run_cli(path, "--fail-on", "warning")[0] == 1
    config = write_config(tmp_path / "c.yaml", {"lint": {"fail_on": "warning"}})
    assert run_cli(path, "--config", str(config))[0] == 1
    assert run_cli(path, "--config", str(config), "--fail-on", "error")[0] == 0


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    code, _, err = run_cli(str(tmp_path / "missing.sql"))
    assert code == 2
    assert "missing.sql: no such file" in err
    assert run_cli()[0] == 2
    assert run_cli(write(tmp_path, CLEAN), "--disable", "no-such-rule")[0] == 2
    with pytest.raises(SystemExit) as exc:
        run_cli(write(tmp_path, CLEAN), "--format", "xml")
    assert exc.value.code == 2
    code, _, err = run_cli(write(tmp_path, CLEAN), "--out", str(tmp_path / "no" / "dir.txt"))
    assert code == 2
    assert "--out" in err
    binary = tmp_path / "binary.sql"
    binary.write_bytes(b"SELECT '\xff\xfe';\n")
    code, _, err = run_cli(str(binary))
    assert code == 2
    assert "not UTF-8" in err


def test_config_lint_section_is_validated_with_its_path(tmp_path: Path) -> None:
    sql = write(tmp_path, CLEAN)
    for data, path in (
        ({"lint": {"disabel": ["x"]}}, "lint.disabel: unknown key"),
        ({"lint": {"disable": ["Not A Rule"]}}, "lint.disable"),
        ({"lint": {"disable": ["no-such-rule"]}}, "lint.disable[0]: unknown rule"),
        ({"lint": {"severity": {"prefer-jsonb": "fatal"}}}, "lint.severity.prefer-jsonb"),
        ({"lint": {"since": "a week"}}, "lint.since"),
        ({"traffic": {"queue_size": 0}}, "traffic.queue_size"),
    ):
        config = write_config(tmp_path / "bad.yaml", data)
        code, _, err = run_cli(sql, "--config", str(config))
        assert code == 2, data
        assert path in err, (data, err)


def test_a_file_that_does_not_parse_is_a_finding_on_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "SELECT 1;\n\nALTER TABLE users ADD COLUMN;\nSELECT 2;\n")
    code, out, _ = run_cli(path)
    assert code == 1
    assert f"{path}:3: error [syntax-error]" in out


def test_disable_by_comment_by_config_and_severity_override(tmp_path: Path) -> None:
    findings = lint_text(tmp_path, BAD)
    assert {"require-concurrent-index-creation", "prefer-jsonb"} <= rules_of(findings)
    commented = "-- dualwrite-lint: disable=prefer-jsonb, require-concurrent-index-creation (ok)\n"
    assert not {"require-concurrent-index-creation", "prefer-jsonb"} & rules_of(
        lint_text(tmp_path, commented + BAD)
    )
    typo = lint_text(tmp_path, "-- dualwrite-lint: disable=prefer-jsonn\n" + BAD)
    assert "disable-unknown-rule" in rules_of(typo)
    assert "prefer-jsonb" in rules_of(typo)
    config = write_config(
        tmp_path / "c.yaml",
        {"lint": {"disable": ["prefer-jsonb"], "severity": {"template-header": "info"}}},
    )
    configured = lint_text(tmp_path, "SELECT 1;\n" + BAD, config=config)
    assert "prefer-jsonb" not in rules_of(configured)
    assert {f.severity for f in configured if f.rule == "template-header"} == {"info"}


def test_psql_meta_commands_and_variables_keep_line_numbers(tmp_path: Path) -> None:
    sql = """\\set ON_ERROR_STOP on
\\set tbl users
SELECT 'a \\ b', $x$ \\not a command $x$;
SELECT format('ALTER TABLE %I ADD COLUMN IF NOT EXISTS n text', :'tbl') \\gexec
CREATE INDEX IF NOT EXISTS users_phone ON :"tbl" (phone);
\\i other.sql
"""
    script = parse_script("m.sql", sql)
    assert script.parse_error is None
    assert [m.name for m in script.meta] == ["\\set", "\\set", "\\gexec", "\\i"]
    assert [s.line for s in script.statements] == [3, 4, 5]
    findings = lint_text(tmp_path, sql)
    index = next(f for f in findings if f.rule == "require-concurrent-index-creation")
    assert index.line == 5
    include = next(f for f in findings if f.rule == "psql-include")
    assert include.line == 6


def test_do_blocks_are_parsed_their_statements_checked(tmp_path: Path) -> None:
    sql = """BEGIN;
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_constraint WHERE conname = 'tx_user_fk') THEN
        ALTER TABLE transactions ADD CONSTRAINT tx_user_fk
            FOREIGN KEY (user_id) REFERENCES users (id);
    END IF;
END $$;
COMMIT;
"""
    findings = lint_text(tmp_path, sql)
    rules = rules_of(findings)
    # the FK inside the DO block is seen: validated on add, no lock_timeout
    assert {"adding-foreign-key-constraint", "lock-timeout-missing"} <= rules
    # guarded by IF NOT EXISTS: re-runnable
    assert "template-idempotent" not in rules
    assert all(f.line == 2 for f in findings if f.rule == "adding-foreign-key-constraint")


def test_set_local_lasts_until_commit(tmp_path: Path) -> None:
    sql = """BEGIN;
SET LOCAL lock_timeout = '2s';
ALTER TABLE users ADD COLUMN IF NOT EXISTS a text;
COMMIT;
ALTER TABLE users ADD COLUMN IF NOT EXISTS b text;
SET LOCAL lock_timeout = '2s';
ALTER TABLE users ADD COLUMN IF NOT EXISTS c text;
SET lock_timeout = 0;
ALTER TABLE users ADD COLUMN IF NOT EXISTS d text;
"""
    lines = sorted(f.line for f in lint_text(tmp_path, sql) if f.rule == "lock-timeout-missing")
    # 3 is covered by SET LOCAL; 5 is after COMMIT; 7: SET LOCAL outside a transaction does
    # nothing; 9: lock_timeout 0 is no timeout
    assert lines == [5, 7, 9]


def test_tables_created_in_the_file_need_no_concurrently(tmp_path: Path) -> None:
    sql = """CREATE TABLE IF NOT EXISTS v2.notes (id bigint PRIMARY KEY, user_id bigint);
CREATE INDEX IF NOT EXISTS notes_user ON v2.notes (user_id);
ALTER TABLE v2.notes ADD CONSTRAINT notes_user_fk FOREIGN KEY (user_id) REFERENCES users (id);
"""
    rules = rules_of(lint_text(tmp_path, sql))
    assert "require-concurrent-index-creation" not in rules
    assert "constraint-missing-not-valid" not in rules
    # the referenced table is an existing one: its SHARE ROW EXCLUSIVE lock still needs a timeout
    assert "lock-timeout-missing" in rules


def test_json_output(tmp_path: Path) -> None:
    path = write(tmp_path, BAD)
    code, out, _ = run_cli(path, "--format", "json")
    assert code == 1
    data = json.loads(out)
    assert data["failed"] is True
    assert data["summary"]["error"] >= 1
    assert data["files"][0]["path"] == path
    assert data["files"][0]["header"]["strategy"] == "expand"
    first = next(f for f in data["findings"] if f["rule"] == "require-concurrent-index-creation")
    assert first["line"] == 7
    assert first["engine"] == "squawk"
    assert {"why", "fix", "severity", "evidence", "path"} <= set(first)


def test_sarif_output_has_the_schema_required_fields(tmp_path: Path) -> None:
    path = write(tmp_path, BAD)
    out_file = tmp_path / "lint.sarif"
    code, out, _ = run_cli(path, "--format", "sarif", "--out", str(out_file))
    assert (code, out) == (1, "")
    sarif = json.loads(out_file.read_text())
    assert sarif["version"] == "2.1.0"
    assert sarif["$schema"].endswith("sarif-2.1.0.json")
    (run,) = sarif["runs"]
    driver = run["tool"]["driver"]
    assert driver["name"]
    rule_ids = [r["id"] for r in driver["rules"]]
    assert len(rule_ids) == len(set(rule_ids))
    assert run["results"]
    for result in run["results"]:
        assert result["message"]["text"]
        assert result["level"] in ("error", "warning", "note")
        assert driver["rules"][result["ruleIndex"]]["id"] == result["ruleId"]
        (location,) = result["locations"]
        physical = location["physicalLocation"]
        assert physical["artifactLocation"]["uri"] == path
        assert physical["region"]["startLine"] >= 1
    levels = {r["ruleId"]: r["level"] for r in run["results"]}
    assert levels["require-concurrent-index-creation"] == "error"
    assert levels["prefer-jsonb"] == "warning"


def test_a_missing_squawk_binary_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DUALWRITE_SQUAWK", str(tmp_path / "nowhere" / "squawk"))
    code, _, err = run_cli(write(tmp_path, CLEAN))
    assert code == 2
    assert "DUALWRITE_SQUAWK" in err


def test_a_squawk_toml_in_the_working_tree_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".squawk.toml").write_text(
        'excluded_rules = ["require-concurrent-index-creation"]\n'
    )
    monkeypatch.chdir(tmp_path)
    assert "require-concurrent-index-creation" in rules_of(lint_text(tmp_path, BAD))


def test_list_rules() -> None:
    code, out, _ = run_cli("--list-rules")
    assert code == 0
    assert "require-concurrent-index-creation" in out
    assert "traffic-still-references" in out
