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

EXIT_OK, EXIT_FINDING, EXIT_USAGE = 0, 1, 2


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


def run_async(coro: Coroutine[Any, Any, int]) -> int:
    """Run a coroutine on uvloop where available."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(coro)


def _load(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    configure_logging(config.logging.level, config.logging.format)
    return config


def cmd_run(args: argparse.Namespace) -> int:
    from dualwrite.service import run_until_signalled  # noqa: PLC0415

    config = _load(args)
    return run_async(run_until_signalled(config))


def cmd_check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    configure_logging("warning", "console")
    if not args.offline:
        from dualwrite.service import upstream_reachable  # noqa: PLC0415

        ok, detail = run_async(_as_exit(upstream_reachable(config)))
        if not ok:
            print(f"dualwrite: upstream not reachable: {detail}", file=sys.stderr)
            return EXIT_USAGE
    print(f"{args.config}: configuration is valid ({len(config.mappings)} mappings)")
    return EXIT_OK


async def _as_exit(coro: Coroutine[Any, Any, tuple[bool, str]]) -> Any:
    return await coro


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dualwrite",
        description="PostgreSQL sidecar for live expand-contract schema migrations.",
    )
    parser.add_argument("--version", action="version", version=f"dualwrite {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
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
