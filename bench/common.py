"""Shared benchmark helpers: the server, pgbouncer, the sidecar, pgbench, and the reports."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import pwd
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import yaml

DSN_ENV = "DUALWRITE_BENCH_DSN"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class BenchError(Exception):
    """The benchmark cannot go on; the message says why and, where it can, what to do."""


# --------------------------------------------------------------------------- servers


@dataclass(frozen=True)
class Server:
    """Where something speaking the PostgreSQL protocol listens, and how to log in."""

    host: str
    port: int
    user: str = "postgres"
    password: str | None = None
    dbname: str = "postgres"

    @classmethod
    def from_dsn(cls, dsn: str) -> Server:
        parts = urlsplit(dsn)
        if parts.scheme not in ("postgres", "postgresql"):
            raise BenchError(f"not a postgresql:// URL: {redact(dsn)}")
        host = unquote(parts.hostname or "127.0.0.1")
        if host.startswith("/"):
            raise BenchError("the benchmark needs a TCP server (host:port), not a Unix socket")
        return cls(
            host=host,
            port=parts.port or 5432,
            user=unquote(parts.username or "postgres"),
            password=unquote(parts.password) if parts.password else None,
            dbname=unquote(parts.path.lstrip("/")) or "postgres",
        )

    def at(self, host: str, port: int) -> Server:
        """The same login, through another address (a pooler or the sidecar)."""
        return replace(self, host=host, port=port)

    def on(self, dbname: str) -> Server:
        return replace(self, dbname=dbname)

    def dsn(self) -> str:
        """A postgresql:// URL without the password (which travels in PGPASSWORD)."""
        return f"postgresql://{quote(self.user)}@{self.host}:{self.port}/{quote(self.dbname)}"

    def client_args(self) -> list[str]:
        """``-h -p -U`` for psql and pgbench."""
        return ["-h", self.host, "-p", str(self.port), "-U", self.user]

    def env(self) -> dict[str, str]:
        env = dict(os.environ, PGCONNECT_TIMEOUT="5", PGAPPNAME="dwbench")
        if self.password:
            env["PGPASSWORD"] = self.password
        return env


def redact(dsn: str) -> str:
    """The DSN with any password replaced by ``***``."""
    return re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", dsn)


def check_identifier(name: str) -> str:
    if not _IDENTIFIER.match(name):
        raise BenchError(f"{name!r}: use lower-case letters, digits and _ for database names")
    return name


def psql(server: Server, *sql: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run each statement as its own ``-c`` (so VACUUM is outside a transaction block)."""
    argv = ["psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", *server.client_args()]
    argv += ["-d", server.dbname]
    for statement in sql:
        argv += ["-c", statement]
    done = subprocess.run(
        argv, env=server.env(), capture_output=True, text=True, timeout=600, check=False
    )
    if check and done.returncode != 0:
        raise BenchError(f"psql on {server.dsn()} failed: {done.stderr.strip()}")
    return done


def query_value(server: Server, sql: str) -> str:
    return psql(server, sql).stdout.strip()


def answers(server: Server) -> bool:
    return psql(server, "SELECT 1", check=False).returncode == 0


def wait_until_answers(server: Server, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not answers(server):
        if time.monotonic() > deadline:
            raise BenchError(f"{what} on {server.host}:{server.port} does not answer queries")
        time.sleep(0.2)


def resolve_server(stack: contextlib.ExitStack, dsn: str | None) -> tuple[Server, str]:
    """The server to benchmark: ``--dsn``, else $DUALWRITE_BENCH_DSN, else local, else throwaway."""
    explicit = dsn or os.environ.get(DSN_ENV)
    if explicit:
        server = Server.from_dsn(explicit)
        if not answers(server):
            raise BenchError(f"{redact(explicit)} does not answer (from --dsn / ${DSN_ENV})")
        return server, "given DSN"
    server = Server.from_dsn(DEFAULT_DSN)
    if answers(server):
        return server, "local server"
    return start_throwaway_server(stack), "throwaway cluster"


def start_throwaway_server(stack: contextlib.ExitStack) -> Server:
    """A temporary cluster from ``dualwrite.embedded``, stopped when the stack unwinds."""
    try:
        from dualwrite.embedded import EmbeddedPostgres  # noqa: PLC0415
    except ImportError:
        raise BenchError(
            f"no PostgreSQL answers on {redact(DEFAULT_DSN)} and dualwrite.embedded is not "
            f"available to start one; pass --dsn or set ${DSN_ENV}"
        ) from None
    progress("starting a throwaway PostgreSQL cluster (dualwrite.embedded; fsync off)")
    try:
        cluster = stack.enter_context(EmbeddedPostgres())
    except RuntimeError as exc:
        raise BenchError(f"cannot start a throwaway cluster: {exc}") from None
    return Server.from_dsn(cluster.dsn())


def ensure_database(server: Server, name: str) -> Server:
    """Create database ``name`` if missing; return the server pointed at it."""
    check_identifier(name)
    exists = query_value(server, f"SELECT 1 FROM pg_database WHERE datname = '{name}'")
    if not exists:
        progress(f"creating database {name}")
        psql(server, f'CREATE DATABASE "{name}"')
    return server.on(name)


# --------------------------------------------------------------------------- processes


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its running descendants (the sidecar's shadow worker is
    a child process: its replays are the sidecar's cost too)."""
    return cpu_seconds(pid) + sum(_cpu_or_zero(child) for child in _children(pid))


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _cpu_or_zero(pid: int) -> float:
    try:
        return tree_cpu_seconds(pid)
    except (OSError, ValueError, IndexError):
        return 0.0  # it exited in between


class Process:
    """A child process the benchmark started; ``stop()`` ends it (TERM, then KILL)."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, **popen: Any) -> None:
        self.name = name
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C reaches us, and we stop it
                **popen,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def own_cpu_seconds(self) -> float:
        """The process alone, without its children (the sidecar's relay process)."""
        return cpu_seconds(self.pid)

    def exited(self) -> bool:
        return self.popen.poll() is not None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        if self.exited():
            return
        self.popen.terminate()
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def died(self) -> BenchError:
        code = self.popen.returncode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
        return BenchError(f"{self.name} (pid {self.pid}) {how}; its output:\n{self.log_tail()}")


def start_process(
    stack: contextlib.ExitStack, name: str, argv: Sequence[str], log_path: Path, **popen: Any
) -> Process:
    """Start a process that is stopped when the stack unwinds (also on Ctrl-C)."""
    process = Process(name, argv, log_path, **popen)
    stack.callback(process.stop)
    return process


def wait_for_port(process: Process, host: str, port: int, timeout: float = 15.0) -> None:
    """Wait until ``process`` accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while True:
        if process.exited():
            raise process.died()
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{process.name} is not listening on {host}:{port} after {timeout}s")
        time.sleep(0.1)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def temp_dir(stack: contextlib.ExitStack, prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    stack.callback(shutil.rmtree, path, ignore_errors=True)
    return path


def install_interrupt_handlers() -> None:
    """Make SIGINT and SIGTERM unwind the stack, so every started process is stopped.

    SIGINT is set explicitly because a shell starting us in the background ignores it.
    """

    def raise_interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, raise_interrupt)


def run_main(
    benchmark: str,
    argv: Sequence[str],
    parse_args: Callable[[Sequence[str]], argparse.Namespace],
    run: Callable[[contextlib.ExitStack, argparse.Namespace, Sequence[str]], int],
) -> int:
    """A benchmark's ``main``: parse, run with every started process stopped on the way out
    (also on Ctrl-C or SIGTERM), and turn what stops it into a message and an exit status."""
    install_interrupt_handlers()
    try:
        args = parse_args(argv)
        with contextlib.ExitStack() as stack:
            return run(stack, args, argv)
    except BenchError as exc:
        print(f"bench {benchmark}: {exc}", file=sys.stderr)
        return 2
    except subprocess.TimeoutExpired as exc:
        print(
            f"bench {benchmark}: {shlex.join(map(str, exc.cmd))} took over {exc.timeout} s",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"bench {benchmark}: interrupted; stopped every process it started", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """One thing pgbench talks to; ``process`` is set when we started it (for CPU accounting)."""

    name: str
    server: Server
    process: Process | None = None

    def cpu_seconds(self) -> float | None:
        return self.process.cpu_seconds() if self.process is not None else None

    def own_cpu_seconds(self) -> float | None:
        return self.process.own_cpu_seconds() if self.process is not None else None


def check_alive(target: Target) -> None:
    """Raise, with the process's last output, if a target we started has gone."""
    if target.process is not None and target.process.exited():
        raise target.process.died()


def pgbouncer_version() -> str:
    return _version_number(tool_version([pgbouncer_binary(), "--version"]))


def pgbouncer_binary() -> str:
    """Path to pgbouncer, installing Debian's package first if it is missing."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")
    if found:
        return found
    if os.geteuid() != 0:
        raise BenchError("pgbouncer is not installed; run: sudo apt-get install -y pgbouncer")
    progress("installing pgbouncer (apt-get install -y pgbouncer)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "pgbouncer"]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        subprocess.run(install, env=env, capture_output=True, check=True)
    found = shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")
    if not found:
        raise BenchError("apt-get installed pgbouncer but the binary is not on PATH")
    return found


def pgbouncer_ini(server: Server, port: int, workdir: Path) -> str:
    """Session pooling, auth_type=any: every client logs in as the server's own user."""
    connection = f"host={server.host} port={server.port} dbname={server.dbname} user={server.user}"
    if server.password:
        connection += f" password={server.password}"
    return "\n".join(
        [
            "[databases]",
            f"{server.dbname} = {connection}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {port}",
            "unix_socket_dir =",
            "auth_type = any",
            "pool_mode = session",
            "max_client_conn = 200",
            "default_pool_size = 50",
            "ignore_startup_parameters = extra_float_digits",
            "log_connections = 0",
            "log_disconnections = 0",
            f"logfile = {workdir / 'pgbouncer.log'}",
            "",
        ]
    )


def _unprivileged_user() -> dict[str, Any]:
    """Popen arguments that drop root to ``postgres`` (pgbouncer refuses to run as root)."""
    if os.geteuid() != 0:
        return {}
    try:
        account = pwd.getpwnam("postgres")
    except KeyError:
        raise BenchError(
            "running as root and there is no 'postgres' user to run pgbouncer as"
        ) from None
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def start_pgbouncer(stack: contextlib.ExitStack, server: Server) -> Target:
    """pgbouncer in session mode in front of ``server.dbname``, on a free local port."""
    binary = pgbouncer_binary()
    workdir = temp_dir(stack, "dwbench-pgbouncer-")
    drop = _unprivileged_user()
    if drop:
        os.chown(workdir, drop["user"], drop["group"])
    port = free_port()
    ini = workdir / "pgbouncer.ini"
    ini.write_text(pgbouncer_ini(server, port, workdir))
    ini.chmod(0o644)
    process = start_process(
        stack, "pgbouncer", [binary, str(ini)], workdir / "stdout.log", cwd=workdir, **drop
    )
    wait_for_port(process, "127.0.0.1", port)
    target = Target("pgbouncer", server.at("127.0.0.1", port), process)
    wait_until_answers(target.server, "pgbouncer")
    return target


def dualwrite_command() -> list[str]:
    script = Path(sys.executable).with_name("dualwrite")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dualwrite"]


def dualwrite_setup(
    config_path: Path,
    server: Server,
    *,
    command: Sequence[str] | None = None,
    cwd: Path = REPO_ROOT,
    what: str = "dualwrite setup",
) -> list[str]:
    """Run ``dualwrite setup --config`` (control schema, mappings validated); its output lines.

    ``command`` is how dualwrite is started (default: this checkout's, see dualwrite_command).
    """
    argv = [*(command or dualwrite_command()), "setup", "--config", str(config_path)]
    done = subprocess.run(
        argv,
        env=server.env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"{what} failed:\n{done.stderr}{done.stdout}")
    return done.stdout.strip().splitlines()


def sidecar_config(
    upstream: Server, port: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A ``dualwrite run`` config relaying 127.0.0.1:port to ``upstream``; ``extra`` adds keys."""
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "upstream": {"host": upstream.host, "port": upstream.port},
        "service_dsn": upstream.dsn(),
        "admin": {"host": "127.0.0.1", "port": 0},
        "logging": {"level": "warning"},
        "shutdown": {"grace_seconds": 2},
    }
    config.update(extra or {})
    return config


def start_sidecar(
    stack: contextlib.ExitStack,
    upstream: Server,
    extra: dict[str, Any] | None = None,
    name: str = "dualwrite",
) -> Target:
    """``dualwrite run --config <tmp yaml>`` as a subprocess, on a free local port."""
    workdir = temp_dir(stack, "dwbench-sidecar-")
    port = free_port()
    config_path = workdir / "dualwrite.yaml"
    config_path.write_text(yaml.safe_dump(sidecar_config(upstream, port, extra)))
    argv = [*dualwrite_command(), "run", "--config", str(config_path)]
    process = start_process(
        stack, name, argv, workdir / "dualwrite.log", cwd=REPO_ROOT, env=upstream.env()
    )
    wait_for_port(process, "127.0.0.1", port)
    target = Target(name, upstream.at("127.0.0.1", port), process)
    wait_until_answers(target.server, name)
    return target


# --------------------------------------------------------------------------- pgbench


@dataclass(frozen=True)
class Workload:
    """A pgbench built-in script: its name on the command line, label, and pgbench flags."""

    name: str
    label: str
    flags: tuple[str, ...]
    writes: bool
    #: a fixed number of clients (and threads), whatever --clients says
    clients: int | None = None


WORKLOADS: dict[str, Workload] = {
    "select": Workload("select", "select-only (-S)", ("-S",), writes=False),
    "tpcb": Workload("tpcb", "TPC-B (default)", (), writes=True),
    # one client, so each transaction's time is the round trip: what a relay adds to latency
    "latency": Workload("latency", "latency (-c 1 -S)", ("-S",), writes=False, clients=1),
}
PROTOCOLS = ("simple", "extended", "prepared")


@dataclass(frozen=True)
class PgbenchResult:
    tps: float
    latency_ms: float
    transactions: int
    failed: int


_TPS = re.compile(r"^tps = ([\d.]+) \((without initial connection time|excluding)", re.M)
_TPS_ANY = re.compile(r"^tps = ([\d.]+)", re.M)
_LATENCY = re.compile(r"^latency average = ([\d.]+) ms", re.M)
_PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)


def parse_pgbench(output: str) -> PgbenchResult:
    """Pull TPS (without connection time), average latency and counts out of pgbench's report."""
    tps = _TPS.search(output) or _TPS_ANY.search(output)
    latency = _LATENCY.search(output)
    processed = _PROCESSED.search(output)
    if not (tps and latency and processed):
        raise BenchError(f"cannot read pgbench's report:\n{output}")
    failed = _FAILED.search(output)
    return PgbenchResult(
        tps=float(tps.group(1)),
        latency_ms=float(latency.group(1)),
        transactions=int(processed.group(1)),
        failed=int(failed.group(1)) if failed else 0,
    )


def pgbench_scale(server: Server) -> int | None:
    """The scale the pgbench tables were initialised with, or None if they are missing."""
    done = psql(server, "SELECT count(*) FROM pgbench_branches", check=False)
    return int(done.stdout.strip()) if done.returncode == 0 else None


def init_pgbench(server: Server, scale: int, force: bool = False) -> None:
    """``pgbench -i -s scale`` unless the tables are already there at that scale."""
    if not force and pgbench_scale(server) == scale:
        return
    progress(f"initialising pgbench tables in {server.dbname} at scale {scale}")
    argv = ["pgbench", "-i", "-q", "-s", str(scale), *server.client_args(), server.dbname]
    done = subprocess.run(argv, env=server.env(), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"pgbench -i failed:\n{done.stderr}")


def reset_pgbench_tables(server: Server, checkpoint: bool) -> None:
    """What pgbench does before a run (we pass -n so it never goes through the target)."""
    statements = ["VACUUM pgbench_branches", "VACUUM pgbench_tellers", "TRUNCATE pgbench_history"]
    psql(server, *statements)
    if checkpoint:
        # start every write run at the same point of the checkpoint cycle; needs pg_checkpoint
        psql(server, "CHECKPOINT", check=False)


def pgbench_against(
    target: Target, workload: Workload, protocol: str, *, clients: int, jobs: int, seconds: int
) -> PgbenchResult:
    """pgbench on ``target``; then, pass or fail, raise if a target we started has died."""
    try:
        return run_pgbench(
            target.server, workload, protocol, clients=clients, jobs=jobs, seconds=seconds
        )
    finally:
        check_alive(target)


def run_pgbench(
    server: Server,
    workload: Workload,
    protocol: str,
    *,
    clients: int,
    jobs: int,
    seconds: int,
) -> PgbenchResult:
    argv = ["pgbench", "-n", *workload.flags, "-M", protocol, "-c", str(clients), "-j", str(jobs)]
    argv += ["-T", str(seconds), *server.client_args(), server.dbname]
    done = subprocess.run(
        argv, env=server.env(), capture_output=True, text=True, timeout=seconds + 120, check=False
    )
    if done.returncode != 0:
        raise BenchError(
            f"{shlex.join(argv)} exited {done.returncode}:\n{done.stderr}{done.stdout}"
        )
    return parse_pgbench(done.stdout)


# --------------------------------------------------------------------------- reports


def csv_choices(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated list of names from ``choices``."""

    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)}")
        return names

    return parse


def add_dsn_option(parser: argparse.ArgumentParser) -> None:
    """``--dsn``: the server to benchmark (see resolve_server)."""
    parser.add_argument("--dsn", help=f"server to benchmark (default ${DSN_ENV}, then local)")


def add_pgbench_options(parser: argparse.ArgumentParser, default_seconds: int) -> None:
    """The pgbench settings every pgbench benchmark takes: scale, clients, jobs, duration."""
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i scale (default 10)")
    parser.add_argument("--reinit", action="store_true", help="re-create the pgbench tables")
    parser.add_argument("--clients", type=int, default=8, help="pgbench -c (default 8)")
    parser.add_argument("--jobs", type=int, default=2, help="pgbench -j (default 2)")
    parser.add_argument("--duration", type=int, help=f"seconds per run (default {default_seconds})")


def add_protocols_option(parser: argparse.ArgumentParser) -> None:
    """``--protocols``: pgbench -M modes, simple and prepared by default."""
    parser.add_argument(
        "--protocols",
        type=csv_choices(PROTOCOLS),
        default=["simple", "prepared"],
        help="comma-separated pgbench -M modes: simple,extended,prepared (default simple,prepared)",
    )


def progress(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def fmt(value: float | None, spec: str = ",.0f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub Markdown table; text columns left-aligned, the rest right-aligned."""
    rows = [list(row) for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    numeric = [all(_looks_numeric(r[i]) for r in rows) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (w - 1) + ":" if n else "-" * w for w, n in zip(widths, numeric, strict=True)]
    return "\n".join([line(headers), line(rule), *(line(r) for r in rows)])


def _looks_numeric(cell: str) -> bool:
    return bool(re.fullmatch(r"n/a|[\d.,x%+-]+", cell.strip()))


def command_line(benchmark: str, argv: Sequence[str]) -> str:
    """How this run was started, as something that can be pasted back into a shell."""
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(Path.cwd())
    return shlex.join([str(python), "-m", "bench", benchmark, *argv])


def tool_version(argv: Sequence[str]) -> str:
    """The first line a ``--version`` style command prints, or ``?``."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=10)
    except OSError:
        return "?"
    return (done.stdout or done.stderr).strip().splitlines()[0] if done.returncode == 0 else "?"


def _version_number(text: str) -> str:
    """``pgbench (PostgreSQL) 15.20 (Debian ...)`` -> ``15.20``."""
    found = re.search(r"\d+(\.\d+)+", text)
    return found.group(0) if found else text


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_revision() -> str:
    """The checked-out commit, marked ``-dirty`` if the tree has changes (read-only git calls)."""
    head = tool_version(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    status = subprocess.run(
        ["git", "--no-optional-locks", "-C", str(REPO_ROOT), "status", "--porcelain", "-uno"],
        capture_output=True,
        text=True,
        check=False,
    )
    return f"{head}-dirty" if status.stdout.strip() else head


def machine_info(server: Server) -> dict[str, Any]:
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "postgresql": query_value(server, "SHOW server_version"),
        "pgbench": _version_number(tool_version(["pgbench", "--version"])),
        "python": platform.python_version(),
        "uvloop": _package_version("uvloop"),
        "dualwrite_commit": git_revision(),
    }


def machine_line(machine: dict[str, Any]) -> str:
    loop = f"uvloop {machine['uvloop']}" if machine["uvloop"] else "asyncio (no uvloop)"
    return (
        f"{machine['nproc']} CPUs ({machine['cpu_model']}), Linux {machine['kernel']}; "
        f"PostgreSQL {machine['postgresql']}; Python {machine['python']}, {loop}"
    )


def load_average() -> float:
    """The 1-minute load average: other work on the box shows up here, and in the spread."""
    return os.getloadavg()[0]


def utc_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def iso_date(moment: datetime) -> str:
    """``2026-12-03T17:12:23Z``."""
    return moment.isoformat().replace("+00:00", "Z")


def run_meta(
    benchmark: str, started: datetime, argv: Sequence[str], origin: str, machine: dict[str, Any]
) -> dict[str, Any]:
    """What every benchmark's JSON and header start with: the run, the machine, the load."""
    return {
        "benchmark": benchmark,
        "command": command_line(benchmark, argv),
        "date": iso_date(started),
        "server_origin": origin,
        "load_start": load_average(),
        "machine": machine,
    }


def write_json(benchmark: str, started: datetime, data: dict[str, Any]) -> Path:
    """Write ``bench/results/<benchmark>-<timestamp>.json`` (the directory is gitignored)."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{benchmark}-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path
