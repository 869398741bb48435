"""The ``dualwrite`` command line: one subcommand per job, each taking ``--config FILE``.

Exit codes: 0 success, 1 a finding (divergence, NO-GO), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from dualwrite import __version__
from dualwrite.config import Config, load_config
from dualwrite.errors import DualwriteError
from dualwrite.logs import configure_logging
from dualwrite.mapping import compile_all

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


def cmd_apply(args: argparse.Namespace) -> int:
    from dualwrite.service import run_applier_until_signalled  # noqa: PLC0415

    config = _load(args)
    return run_async(run_applier_until_signalled(config))


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
        "apply",
        cmd_apply,
        "Run only the outbox applier (copies captured keys to the targets) until SIGTERM.",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.handler(args))
    except DualwriteError as exc:
        kind = "config error" if exc.exit_code == EXIT_USAGE else "error"
        print(f"dualwrite: {kind}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
