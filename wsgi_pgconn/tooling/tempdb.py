"""Throwaway local PostgreSQL clusters for tests, examples and benchmarks.

:class:`TemporaryCluster` runs ``initdb`` into a fresh temporary directory,
starts a private ``postgres`` on 127.0.0.1 and a private unix socket, and
deletes everything again on :meth:`TemporaryCluster.cleanup` (or on interpreter
exit, as a fallback).  The cluster is tuned for speed, not durability
(``fsync=off`` and friends), so never keep data you care about in it.

Authentication: TCP connections use scram-sha-256 with a random password
(:attr:`TemporaryCluster.password`); connections over the unix socket, whose
directory only the cluster's OS user (and root) can enter, are trusted.

Example::

    import psycopg2
    from wsgi_pgconn.tooling.tempdb import TemporaryCluster

    with TemporaryCluster() as cluster:
        conn = psycopg2.connect(cluster.dsn())  # TCP + password
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
        finally:
            conn.close()
        cluster.create_database("app")
        app_url = cluster.url(dbname="app")  # postgresql://postgres:...@127.0.0.1:PORT/app

From a shell, ``python -m wsgi_pgconn.tempdb`` runs a cluster in the
foreground, prints a ``DATABASE_URL=...`` line and deletes the cluster on
Ctrl-C.

The server programs (``initdb``, ``pg_ctl``, ``postgres``) are located with
:func:`find_bindir`.  PostgreSQL refuses to run as root; when the calling
process is root, the server programs run as an unprivileged OS user (the
``postgres`` user if it exists, otherwise ``nobody``) via ``runuser``.
POSIX only.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import re
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING
from urllib.parse import quote, urlencode

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import make_dsn

from wsgi_pgconn.tooling.ports import PORT_RANGE_ENV, PortRangeError, free_port

if TYPE_CHECKING:
    import pwd

    if sys.version_info >= (3, 11):
        from typing import Self
    else:
        from typing_extensions import Self

__all__ = [
    "BINDIR_ENV",
    "TempClusterError",
    "TemporaryCluster",
    "find_bindir",
    "main",
]

#: Environment variable naming the directory that holds ``initdb``/``pg_ctl``.
BINDIR_ENV = "WSGI_PGCONN_PG_BINDIR"

_SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres")
_VERSIONED_BINDIR_GLOBS = ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin")
_SHUTDOWN_MODES = ("smart", "fast", "immediate")
# Settings the cluster manages itself; overriding them would make host/port/
# socket_dir lie.
_MANAGED_SETTINGS = frozenset({"port", "unix_socket_directories"})
# A complete single-quoted postgresql.conf string literal.
_QUOTED_LITERAL = re.compile(r"^'(?:[^'\\]|''|\\.)*'$", re.DOTALL)
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
# sockaddr_un.sun_path is 108 bytes on Linux (104 on the BSDs), NUL included.
_MAX_SOCKET_PATH = 103
_PG_CTL_WAIT = 30  # seconds pg_ctl -w waits for start/stop
_DB_ROLE = "postgres"
_DB_NAME = "postgres"
_HOST = "127.0.0.1"


class TempClusterError(RuntimeError):
    """A temporary PostgreSQL cluster could not be found, created or controlled."""


# --------------------------------------------------------------------------
# locating the server programs


def _missing_programs(directory: Path) -> list[str]:
    return [
        name
        for name in _SERVER_PROGRAMS
        if not (directory / name).is_file() or not os.access(directory / name, os.X_OK)
    ]


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/15/bin -> (15,); /usr/pgsql-9.6/bin -> (9, 6)
    match = re.search(r"(\d+(?:\.\d+)*)$", path.parent.name)
    return tuple(int(part) for part in match.group(1).split(".")) if match else ()


def find_bindir() -> Path:
    """Return the directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Searched in order: the ``WSGI_PGCONN_PG_BINDIR`` environment variable,
    ``PATH`` (the directory of ``initdb``), ``pg_config --bindir``, then the
    newest of ``/usr/lib/postgresql/*/bin`` (Debian/Ubuntu) and
    ``/usr/pgsql-*/bin`` (PGDG RPMs).

    Raises:
        TempClusterError: nothing suitable was found, or ``WSGI_PGCONN_PG_BINDIR``
            points at a directory lacking one of the programs.
    """
    override = os.environ.get(BINDIR_ENV)
    if override:
        directory = Path(override).expanduser()
        missing = _missing_programs(directory)
        if missing:
            raise TempClusterError(
                f"{BINDIR_ENV}={override!r} does not contain executable "
                f"{', '.join(missing)}; point it at the directory holding the "
                "PostgreSQL server programs (for example /usr/lib/postgresql/15/bin)"
            )
        return directory

    initdb = shutil.which("initdb")
    if initdb is not None:
        # Prefer the real bindir when initdb on PATH is a symlink into it.
        for directory in (Path(initdb).resolve().parent, Path(initdb).parent):
            if not _missing_programs(directory):
                return directory

    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        try:
            result = subprocess.run(
                [pg_config, "--bindir"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            pass
        else:
            if result.returncode == 0 and result.stdout.strip():
                directory = Path(result.stdout.strip())
                if not _missing_programs(directory):
                    return directory

    candidates = [
        Path(match) for pattern in _VERSIONED_BINDIR_GLOBS for match in glob.glob(pattern)
    ]
    for directory in sorted(candidates, key=_version_key, reverse=True):
        if not _missing_programs(directory):
            return directory

    raise TempClusterError(
        "could not find the PostgreSQL server programs (initdb, pg_ctl, postgres). "
        f"Searched: ${BINDIR_ENV} (unset), PATH, `pg_config --bindir`"
        f"{' (pg_config not found)' if pg_config is None else ''}, "
        f"{', '.join(_VERSIONED_BINDIR_GLOBS)}. "
        "Install the server (Debian/Ubuntu: `apt-get install postgresql`; "
        "Fedora/RHEL: `dnf install postgresql-server`; macOS: `brew install postgresql`), "
        f"set {BINDIR_ENV} to the directory containing initdb, "
        "or use an existing server by setting a DSN (e.g. DATABASE_URL) instead."
    )


# --------------------------------------------------------------------------
# running the server programs, possibly as another OS user


@dataclass
class _Runner:
    """Runs the server programs with a clean environment, as ``run_as`` if set."""

    bindir: Path
    cwd: Path
    run_as: pwd.struct_passwd | None = None
    switch_tool: tuple[str, str] | None = None  # (kind, path): runuser/setpriv/su
    env: dict[str, str] = field(default_factory=dict, repr=False)

    def command(self, program: str, args: Sequence[str]) -> list[str]:
        argv = [str(self.bindir / program), *args]
        if self.run_as is None or self.switch_tool is None:
            return argv
        kind, tool = self.switch_tool
        if kind == "runuser":
            return [tool, "-u", self.run_as.pw_name, "--", *argv]
        if kind == "setpriv":
            return [
                tool,
                f"--reuid={self.run_as.pw_uid}",
                f"--regid={self.run_as.pw_gid}",
                "--init-groups",
                "--",
                *argv,
            ]
        return [tool, "-s", "/bin/sh", "-c", shlex.join(argv), self.run_as.pw_name]

    def run(self, program: str, *args: str, timeout: float, check: bool = True) -> tuple[int, str]:
        """Run ``program``; return ``(returncode, output)``.

        Output goes to temporary files rather than pipes so that a daemon
        accidentally inheriting stdout/stderr can never make us hang.
        """
        argv = self.command(program, args)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    cwd=self.cwd,
                    env=self.env,
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise TempClusterError(
                    f"{program} did not finish within {timeout:g}s: {shlex.join(argv)}"
                ) from exc
            except OSError as exc:
                raise TempClusterError(f"could not run {shlex.join(argv)}: {exc}") from exc
            out.seek(0)
            err.seek(0)
            stdout = out.read().decode("utf-8", "replace")
            stderr = err.read().decode("utf-8", "replace")
        if check and proc.returncode != 0:
            detail = stderr.strip() or stdout.strip() or "(no output)"
            raise TempClusterError(
                f"{program} failed with exit status {proc.returncode}: {shlex.join(argv)}\n{detail}"
            )
        return proc.returncode, stderr + stdout


def _clean_env() -> dict[str, str]:
    # PGDATA, PGPORT, PGHOST, ... from the caller must not steer pg_ctl/initdb,
    # and C messages keep error text predictable.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    return env


def _find_switch_tool() -> tuple[str, str]:
    search_path = os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"]
    )
    for kind in ("runuser", "setpriv", "su"):
        tool = shutil.which(kind, path=search_path)
        if tool is not None:
            return kind, tool
    raise TempClusterError(
        "running as root, but none of runuser, setpriv or su was found to run "
        "PostgreSQL as an unprivileged user (install util-linux)"
    )


def _resolve_os_user(name: str | None) -> pwd.struct_passwd:
    import pwd

    if name is not None:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            raise TempClusterError(f"OS user {name!r} does not exist") from None
    for candidate in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(candidate)
    raise TempClusterError(
        "running as root, but neither the 'postgres' nor the 'nobody' OS user "
        "exists to run PostgreSQL; pass user=... naming an unprivileged user"
    )


def _check_traversable(path: Path, account: pwd.struct_passwd) -> None:
    groups = set(os.getgrouplist(account.pw_name, account.pw_gid))
    for directory in (path, *path.parents):
        st = directory.stat()
        if st.st_uid == account.pw_uid:
            allowed = st.st_mode & stat.S_IXUSR
        elif st.st_gid in groups:
            allowed = st.st_mode & stat.S_IXGRP
        else:
            allowed = st.st_mode & stat.S_IXOTH
        if not allowed:
            raise TempClusterError(
                f"the OS user {account.pw_name!r} that runs PostgreSQL cannot enter "
                f"{directory} (mode {stat.filemode(st.st_mode)}); pass a base_dir it "
                f"can reach, such as {tempfile.gettempdir()}"
            )


# --------------------------------------------------------------------------
# small helpers


def _pick_port() -> int:
    try:
        return free_port(_HOST)
    except PortRangeError as exc:
        raise TempClusterError(str(exc)) from None


def _conf_value(value: str) -> str:
    """Quote ``value`` for postgresql.conf, unless it is already a quoted literal."""
    if any(ch in value for ch in "\r\n\0"):
        raise ValueError("setting values must not contain newlines or NUL")
    if _QUOTED_LITERAL.match(value):
        return value  # e.g. "'pg_stat_statements'": written as given
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _read_pid(data_dir: Path) -> int | None:
    try:
        first = (data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
    except (OSError, UnicodeDecodeError):
        return None
    try:
        pid = int(first.strip())
    except ValueError:
        return None
    return pid if pid > 0 else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no procfs: trust kill(0)
    return state not in ("Z", "X")  # a zombie is not a running postmaster


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def _remove_tree(path: Path) -> None:
    for _ in range(3):
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)  # a dying postgres may still be writing
        else:
            return
    shutil.rmtree(path, ignore_errors=True)


def _shutdown(runner: _Runner, data_dir: Path, mode: str, timeout: float) -> None:
    """Stop the postmaster in ``data_dir``; escalate to immediate, then SIGKILL."""
    modes = [mode] if mode == "immediate" else [mode, "immediate"]
    errors: list[str] = []
    for current in modes:
        pid = _read_pid(data_dir)
        if pid is None or not _pid_alive(pid):
            return
        try:
            wait = str(max(1, round(timeout)))
            args = ["stop", "-w", "-t", wait, "-m", current, "-D", str(data_dir)]
            runner.run("pg_ctl", *args, timeout=timeout + 30)
        except TempClusterError as exc:
            errors.append(str(exc))
        else:
            return
    pid = _read_pid(data_dir)
    if pid is not None and _pid_alive(pid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)  # children notice postmaster death and exit
        deadline = time.monotonic() + 5
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_alive(pid):
            raise TempClusterError(f"could not stop postmaster {pid}:\n" + "\n".join(errors))


def _finalize(runner: _Runner, data_dir: Path, dirs: list[Path], owner_pid: int) -> None:
    # Runs once: from cleanup(), when the cluster is garbage collected, or at
    # interpreter exit.  A forked child (e.g. a pre-fork WSGI worker) inherits
    # the finalizer but must not tear down its parent's cluster.
    if os.getpid() != owner_pid:
        return
    try:
        if data_dir.is_dir():
            _shutdown(runner, data_dir, "fast", timeout=10)
    finally:
        for directory in dirs:
            _remove_tree(directory)


# --------------------------------------------------------------------------
# the cluster


class TemporaryCluster:
    """A private PostgreSQL cluster in a temporary directory.

    Args:
        base_dir: parent for the cluster's temporary directory (default:
            :func:`tempfile.gettempdir`).  When running as root it must be
            enterable by the unprivileged OS user that runs PostgreSQL.
        port: TCP port on 127.0.0.1 (default: a free port in the range of
            ``WSGI_PGCONN_PORT_RANGE``, 20000-29999 unless set).
        user: OS user to run PostgreSQL as when the caller is root (default:
            ``postgres`` if it exists, else ``nobody``).  Ignored otherwise.
        settings: extra ``postgresql.conf`` settings, e.g. ``{"work_mem":
            "8MB"}``.  Values are quoted for you; a value that already is a
            complete single-quoted literal (``"'pg_stat_statements'"``) is
            written unchanged.  ``port`` and ``unix_socket_directories`` are
            managed by the cluster and rejected here.

    Use as a context manager, or call :meth:`start` and :meth:`cleanup`.
    Clusters that are never cleaned up are stopped and deleted when garbage
    collected or at interpreter exit.
    """

    def __init__(
        self,
        *,
        base_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        user: str | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535, not {port!r}")
        extra: dict[str, str] = {}
        for name, value in (settings or {}).items():
            if not _SETTING_NAME.match(name):
                raise ValueError(f"invalid setting name {name!r}")
            if name.lower() in _MANAGED_SETTINGS:
                raise ValueError(f"setting {name!r} is managed by TemporaryCluster")
            extra[name] = _conf_value(str(value))
        self._settings = extra
        self._base_dir = Path(base_dir) if base_dir is not None else None
        self._requested_user = user
        self._port = port
        self._port_fixed = port is not None
        self._password = secrets.token_urlsafe(24)
        self._lock = threading.RLock()
        self._runner: _Runner | None = None
        self._root: Path | None = None
        self._socket_dir: Path | None = None
        self._dirs: list[Path] = []
        self._finalizer: weakref.finalize[..., TemporaryCluster] | None = None
        self._initialized = False
        self._started_once = False

    # -- properties --------------------------------------------------------

    @property
    def host(self) -> str:
        """TCP host the server listens on (``127.0.0.1``)."""
        return _HOST

    @property
    def port(self) -> int:
        """TCP port (also part of the unix socket's file name)."""
        if self._port is None:
            raise TempClusterError("the cluster has not been started yet; no port chosen")
        return self._port

    @property
    def socket_dir(self) -> Path:
        """Directory holding the server's unix socket (trust authentication)."""
        if self._socket_dir is None:
            raise TempClusterError("the cluster has not been started yet")
        return self._socket_dir

    @property
    def password(self) -> str:
        """Password of the ``postgres`` role, required over TCP (scram-sha-256)."""
        return self._password

    @property
    def user(self) -> str:
        """Database superuser role name (``postgres``)."""
        return _DB_ROLE

    @property
    def dbname(self) -> str:
        """Default database name (``postgres``)."""
        return _DB_NAME

    @property
    def directory(self) -> Path:
        """The cluster's temporary directory (data, socket, log)."""
        if self._root is None:
            raise TempClusterError("the cluster has not been started yet")
        return self._root

    @property
    def data_dir(self) -> Path:
        """The PostgreSQL data directory (PGDATA)."""
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        """Server log file (written via ``pg_ctl -l``)."""
        return self.directory / "postgres.log"

    @property
    def os_user(self) -> str | None:
        """OS user PostgreSQL runs as when the caller is root, else ``None``."""
        if self._runner is None or self._runner.run_as is None:
            return None
        return self._runner.run_as.pw_name

    @property
    def removed(self) -> bool:
        """True once :meth:`cleanup` has deleted the cluster."""
        return self._finalizer is not None and not self._finalizer.alive

    # -- connection strings -------------------------------------------------

    def dsn(self, *, tcp: bool = True, dbname: str | None = None, **params: str | int) -> str:
        """libpq ``key=value`` connection string.

        ``tcp=True``: host/port/user/password (scram-sha-256).  ``tcp=False``:
        the unix socket directory as host, no password (trust).  Extra
        ``params`` (e.g. ``connect_timeout=5``) are added or override.
        """
        params_ = self._conn_params(tcp=tcp, dbname=dbname, params=params)
        return make_dsn(None, **{key: str(value) for key, value in params_.items()})

    def url(self, *, tcp: bool = True, dbname: str | None = None, **params: str | int) -> str:
        """The same as :meth:`dsn`, as a ``postgresql://`` URL.

        For ``tcp=False`` the socket directory is passed as the ``host`` query
        parameter (``postgresql://postgres@/postgres?host=/tmp/...&port=...``).
        """
        db = quote(dbname if dbname is not None else self.dbname, safe="")
        user = quote(self.user, safe="")
        query: dict[str, str] = {}
        if tcp:
            netloc = f"{user}:{quote(self.password, safe='')}@{self.host}:{self.port}"
        else:
            netloc = f"{user}@"
            query = {"host": str(self.socket_dir), "port": str(self.port)}
        query.update({key: str(value) for key, value in params.items()})
        url = f"postgresql://{netloc}/{db}"
        if query:
            url += "?" + urlencode(query, quote_via=quote, safe="/")
        return url

    def _conn_params(
        self, *, tcp: bool, dbname: str | None, params: Mapping[str, str | int]
    ) -> dict[str, str | int]:
        result: dict[str, str | int] = {
            "host": self.host if tcp else str(self.socket_dir),
            "port": self.port,
            "user": self.user,
            "dbname": dbname if dbname is not None else self.dbname,
        }
        if tcp:
            result["password"] = self.password
        result.update(params)
        return result

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> Self:
        """Create the cluster on first use, then start the server; returns self.

        A no-op when already running.  After :meth:`stop` it starts the same
        data directory again on the same port with the same password.
        """
        with self._lock:
            if self.removed:
                raise TempClusterError("the cluster has been cleaned up; create a new one")
            if not self._initialized:
                try:
                    self._create()
                    self._start_server()
                except BaseException:
                    self.cleanup()
                    raise
            elif not self.is_running():
                self._start_server()
        return self

    def stop(self, mode: str = "fast", *, timeout: float = _PG_CTL_WAIT) -> None:
        """Stop the server (``pg_ctl stop -m MODE``), keeping its files.

        If a ``smart``/``fast`` stop does not finish within ``timeout``
        seconds, an ``immediate`` stop follows, then SIGKILL.
        """
        _check_mode(mode)
        with self._lock:
            if not self._initialized or self.removed:
                return
            assert self._runner is not None
            _shutdown(self._runner, self.data_dir, mode, timeout)

    def restart(self, mode: str = "fast") -> None:
        """Restart the server (``pg_ctl restart -m MODE -w``); starts it if stopped."""
        _check_mode(mode)
        with self._lock:
            if not self._initialized or not self.is_running():
                self.start()
                return
            assert self._runner is not None
            offset = self._log_size()
            try:
                args = ["restart", "-w", "-t", str(_PG_CTL_WAIT), "-m", mode]
                args += ["-D", str(self.data_dir), "-l", str(self.log_path)]
                self._runner.run("pg_ctl", *args, timeout=2 * _PG_CTL_WAIT + 30)
            except TempClusterError as exc:
                raise self._with_log(exc, offset) from None

    def is_running(self) -> bool:
        """True if the cluster's postmaster process is alive."""
        if not self._initialized or self.removed:
            return False
        pid = _read_pid(self.data_dir)
        return pid is not None and _pid_alive(pid)

    def cleanup(self) -> None:
        """Stop the server and delete the whole temporary directory.  Idempotent."""
        with self._lock:
            if self._finalizer is not None:
                self._finalizer()

    def create_database(self, name: str) -> None:
        """``CREATE DATABASE name`` (connecting over the unix socket)."""
        conn = psycopg2.connect(self.dsn(tcp=False, connect_timeout=10))
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        finally:
            conn.close()

    def read_log(self) -> str:
        """Return the server log so far ("" if there is none yet)."""
        if self._root is None:
            return ""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        if self._root is None:
            state = "not started"
        elif self.removed:
            state = "removed"
        else:
            state = "running" if self.is_running() else "stopped"
        where = f" dir={str(self._root)!r}" if self._root is not None else ""
        port = f" port={self._port}" if self._port is not None else ""
        return f"<TemporaryCluster {state}{where}{port}>"

    # -- internals ----------------------------------------------------------

    def _create(self) -> None:
        bindir = find_bindir()
        run_as = None
        switch_tool = None
        if os.geteuid() == 0:
            run_as = _resolve_os_user(self._requested_user)
            switch_tool = _find_switch_tool()

        base = self._base_dir if self._base_dir is not None else Path(tempfile.gettempdir())
        base.mkdir(mode=0o755, parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="wsgi_pgconn-", dir=base)).resolve()
        self._root = root
        self._dirs.append(root)
        runner = _Runner(
            bindir=bindir, cwd=root, run_as=run_as, switch_tool=switch_tool, env=_clean_env()
        )
        self._runner = runner
        self._finalizer = weakref.finalize(
            self, _finalize, runner, root / "data", self._dirs, os.getpid()
        )
        # mkdtemp makes it 0700; the unprivileged OS user must be able to enter.
        os.chmod(root, 0o755)  # noqa: S103
        if run_as is not None:
            _check_traversable(root, run_as)

        data_dir = root / "data"
        data_dir.mkdir(mode=0o700)
        socket_dir = root / "sock"
        if len(str(socket_dir)) + len("/.s.PGSQL.65535") > _MAX_SOCKET_PATH:
            socket_dir = Path(tempfile.mkdtemp(prefix="pgsock-", dir="/tmp"))
            self._dirs.append(socket_dir)
        else:
            socket_dir.mkdir(mode=0o700)
        os.chmod(socket_dir, 0o700)
        self._socket_dir = socket_dir
        self._create_file(self.log_path, "")
        for path in (data_dir, socket_dir):
            self._chown(path)

        pwfile = root / "pwfile"
        self._create_file(pwfile, self._password + "\n")
        try:
            args = ["-D", str(data_dir), "-U", _DB_ROLE, "-E", "UTF8", "--locale=C"]
            args += ["--auth-local=trust", "--auth-host=scram-sha-256"]
            args += [f"--pwfile={pwfile}", "--no-sync"]
            runner.run("initdb", *args, timeout=300)
        finally:
            pwfile.unlink(missing_ok=True)

        with open(data_dir / "postgresql.conf", "a", encoding="utf-8") as fh:
            fh.write("\n# added by wsgi_pgconn.tooling.tempdb\ninclude 'wsgi_pgconn.conf'\n")
        if self._port is None:
            self._port = _pick_port()
        self._write_conf()
        self._initialized = True

    def _write_conf(self) -> None:
        assert self._socket_dir is not None
        assert self._port is not None
        lines = [
            "# throwaway cluster managed by wsgi_pgconn.tooling.tempdb: durability is OFF",
            f"listen_addresses = {_conf_value(_HOST)}",
            f"port = {self._port}",
            f"unix_socket_directories = {_conf_value(str(self._socket_dir))}",
            "fsync = off",
            "synchronous_commit = off",
            "full_page_writes = off",
            "max_connections = 200",
            "logging_collector = off",
            f"log_line_prefix = {_conf_value('%m [%p] ')}",
            f"password_encryption = {_conf_value('scram-sha-256')}",
        ]
        lines += [f"{name} = {value}" for name, value in self._settings.items()]
        path = self.data_dir / "wsgi_pgconn.conf"
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        self._chown(path)

    def _start_server(self) -> None:
        assert self._runner is not None
        attempts = 1 if self._port_fixed else 4
        for attempt in range(attempts):
            offset = self._log_size()
            try:
                args = ["start", "-w", "-t", str(_PG_CTL_WAIT)]
                args += ["-D", str(self.data_dir), "-l", str(self.log_path)]
                self._runner.run("pg_ctl", *args, timeout=_PG_CTL_WAIT + 30)
            except TempClusterError as exc:
                new_log = self.read_log()[offset:]
                port_taken = "could not bind" in new_log or "already in use" in new_log
                if port_taken and attempt + 1 < attempts and not self._started_once:
                    # Somebody grabbed the port between our check and postgres'
                    # bind(); pick another one.  Only before the first successful
                    # start, so DSNs handed out earlier stay valid.
                    self._port = _pick_port()
                    self._write_conf()
                    continue
                raise self._with_log(exc, offset) from None
            self._started_once = True
            return

    def _log_size(self) -> int:
        return len(self.read_log())

    def _with_log(self, exc: TempClusterError, offset: int) -> TempClusterError:
        log = _tail(self.read_log()[offset:])
        if log:
            return TempClusterError(f"{exc}\nserver log ({self.log_path}):\n{log}")
        return exc

    def _create_file(self, path: Path, content: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(content)
        self._chown(path)

    def _chown(self, path: Path) -> None:
        assert self._runner is not None
        account = self._runner.run_as
        if account is not None:
            os.chown(path, account.pw_uid, account.pw_gid)

    def _detach(self) -> None:
        """Forget the cluster without deleting it (``--keep``)."""
        if self._finalizer is not None:
            self._finalizer.detach()


def _check_mode(mode: str) -> None:
    if mode not in _SHUTDOWN_MODES:
        raise ValueError(f"mode must be one of {', '.join(_SHUTDOWN_MODES)}, not {mode!r}")


# --------------------------------------------------------------------------
# python -m wsgi_pgconn.tempdb


def _parse_setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value


def main(argv: Sequence[str] | None = None) -> int:
    """Run a throwaway cluster in the foreground until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m wsgi_pgconn.tempdb",
        description=(
            "Run a throwaway PostgreSQL cluster in the foreground. Prints "
            "DATABASE_URL=... (TCP, including the generated password of this "
            "throwaway cluster -- printing it is the purpose of this command) and "
            "DATABASE_URL_UNIX=... (unix socket, trust auth, no password), then "
            "waits; Ctrl-C or SIGTERM stops the server and deletes its directory."
        ),
    )
    parser.add_argument(
        "--port",
        type=int,
        help=f"TCP port (default: a free one in ${PORT_RANGE_ENV}, 20000-29999 unless set)",
    )
    parser.add_argument(
        "--dbname",
        help=(
            "create this database too, and print URLs that name it (default: the "
            "printed URLs name the database 'postgres')"
        ),
    )
    parser.add_argument("--base-dir", help="parent directory (default: the system temp dir)")
    parser.add_argument(
        "--user", help="OS user to run postgres as when started as root (default: postgres)"
    )
    parser.add_argument(
        "-c",
        "--set",
        dest="settings",
        action="append",
        default=[],
        type=_parse_setting,
        metavar="NAME=VALUE",
        help="extra postgresql.conf setting (repeatable)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="on exit, stop the server but keep its directory instead of deleting it",
    )
    args = parser.parse_args(argv)

    stop_requested = threading.Event()

    def _request_stop(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    handled = [signal.SIGINT, signal.SIGTERM]
    if hasattr(signal, "SIGHUP"):
        handled.append(signal.SIGHUP)
    previous: dict[signal.Signals, Callable[[int, FrameType | None], object] | int | None] = {
        sig: signal.signal(sig, _request_stop) for sig in handled
    }
    cluster: TemporaryCluster | None = None
    status = 0
    try:
        try:
            cluster = TemporaryCluster(
                base_dir=args.base_dir, port=args.port, user=args.user, settings=dict(args.settings)
            )
            cluster.start()
            if args.dbname:
                cluster.create_database(args.dbname)
        except (TempClusterError, ValueError, psycopg2.Error) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"DATABASE_URL={cluster.url(dbname=args.dbname)}", flush=True)
        print(f"DATABASE_URL_UNIX={cluster.url(tcp=False, dbname=args.dbname)}", flush=True)
        action = "stop it (files are kept)" if args.keep else "stop and delete it"
        print(
            f"throwaway PostgreSQL cluster at {cluster.directory}; Ctrl-C to {action}",
            file=sys.stderr,
            flush=True,
        )
        while not stop_requested.wait(0.5):
            if not cluster.is_running():
                print(
                    "error: postgres exited unexpectedly; end of its log:\n"
                    + _tail(cluster.read_log()),
                    file=sys.stderr,
                )
                status = 1
                break
    finally:
        if cluster is not None:
            if args.keep and cluster.is_running():
                cluster.stop()
                cluster._detach()
                _print_keep_hint(cluster)
            else:
                cluster.cleanup()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status


def _print_keep_hint(cluster: TemporaryCluster) -> None:
    assert cluster._runner is not None
    argv = cluster._runner.command(
        "pg_ctl", ["start", "-D", str(cluster.data_dir), "-l", str(cluster.log_path)]
    )
    print(
        f"stopped; kept {cluster.directory}\n"
        f"start it again with: {shlex.join(argv)}\n"
        f"delete it with: rm -rf {shlex.quote(str(cluster.directory))}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    sys.exit(main())
