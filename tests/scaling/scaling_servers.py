"""Launchers for the scaling tests: PgBouncer, pgpool-II and a streaming-replication standby.

Everything runs on 127.0.0.1 on ports of ``WSGI_PGCONN_PORT_RANGE`` (20000-29999
unless set), in a private temporary
directory, as the unprivileged OS user of the throwaway cluster (``postgres``
when the tests run as root: PgBouncer, pgpool-II and PostgreSQL refuse to run
as root). The poolers reach PostgreSQL over its unix socket, where the
cluster trusts local connections; clients log in to them over TCP with
scram-sha-256 and a password kept in plain text in the pooler's private auth
file (PgBouncer 1.18 cannot log in to the server with a scram secret for a
client that did not itself use scram over TCP).

Nothing here sleeps to synchronise: readiness is polled against a deadline.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psycopg2
import psycopg2.extensions
import pytest

from wsgi_pgconn.tooling.ports import free_port
from wsgi_pgconn.tooling.tempdb import TemporaryCluster, find_bindir

INSTALL_SCRIPT = ".ci/install-scaling.sh"
LOOPBACK = "127.0.0.1"

T = TypeVar("T")


# -- small utilities ------------------------------------------------------------


def find_program(name: str) -> str | None:
    """The path of ``name`` on PATH or in the sbin directories Debian uses for daemons."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
    return shutil.which(name, path=path)


def require_program(name: str, package: str) -> str:
    """The program's path; if missing, FAIL under CI (naming the install script), else skip."""
    found = find_program(name)
    if found is not None:
        return found
    message = (
        f"{name} is not installed (Debian package {package}); run `bash {INSTALL_SCRIPT}` "
        "(apt-get install pgbouncer pgpool2) to run the scaling tests"
    )
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def poll(
    what: str, check: Callable[[], T | None], *, timeout: float = 15.0, interval: float = 0.02
) -> T:
    """Call ``check`` until it returns something other than None, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    attempts = 0
    while True:
        attempts += 1
        result = check()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not after {timeout:g}s ({attempts} attempts)")
        time.sleep(interval)  # the polling interval, bounded by the deadline


def try_connect(dsn: str) -> psycopg2.extensions.connection | None:
    """A connection, or None while the server is not accepting them yet."""
    try:
        return psycopg2.connect(dsn, connect_timeout=3)
    except psycopg2.OperationalError:
        return None


def query(dsn: str, sql: str, args: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
    """Run one statement in autocommit on a new connection; the rows."""
    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def os_account(cluster: TemporaryCluster) -> pwd.struct_passwd | None:
    """The unprivileged account the daemons run as (None: we are not root, run as ourselves)."""
    if os.geteuid() != 0:
        return None
    return pwd.getpwnam(cluster.os_user or "postgres")


def _quote_ini(value: object) -> str:
    text = str(value)
    if any(ch in text for ch in "\r\n\0"):
        raise ValueError("configuration values must not contain newlines")
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# -- a daemon run as the cluster's OS user ----------------------------------------


class Daemon:
    """A server process in its own temporary directory, owned by the cluster's OS user."""

    name = "daemon"
    stop_signal = signal.SIGTERM

    def __init__(self, cluster: TemporaryCluster) -> None:
        self.cluster = cluster
        self.account = os_account(cluster)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"wsgi_pgconn-{self.name}-"))
        self.log_path = self.workdir / f"{self.name}.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._chown(self.workdir)

    def _chown(self, path: Path) -> None:
        if self.account is not None:
            os.chown(path, self.account.pw_uid, self.account.pw_gid)

    def write(self, name: str, content: str) -> Path:
        """A private file (mode 0600) in the work directory, owned by the daemon's user."""
        path = self.workdir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(content)
        self._chown(path)
        return path

    def argv(self, program: Sequence[str]) -> list[str]:
        if self.account is None:
            return list(program)
        return [_runuser(), "-u", self.account.pw_name, "--", *program]

    def launch(self, program: Sequence[str]) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv(program),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )

    def ensure_running(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            code = None if proc is None else proc.returncode
            raise RuntimeError(f"{self.name} exited ({code}); its log:\n{self.read_log()}")

    def wait_ready(self, dsn: str, timeout: float = 20.0) -> None:
        def ready() -> bool | None:
            self.ensure_running()
            conn = try_connect(dsn)
            if conn is None:
                return None
            conn.close()
            return True

        try:
            poll(f"{self.name} accepting connections on port {self.port}", ready, timeout=timeout)
        except BaseException:
            self.stop()
            raise

    def read_log(self, tail: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-tail:])

    def daemon_pid(self) -> int | None:
        """The daemon's own pid: runuser's child when we are root, else our child."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return None
        if self.account is None:
            return proc.pid
        try:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def stop(self) -> None:
        proc = self.proc
        if proc is not None:
            # Signal the daemon itself: runuser would turn any signal into SIGTERM,
            # then SIGKILL after two seconds. runuser exits when the daemon has.
            pid = self.daemon_pid()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, self.stop_signal)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the session we started, by its id
                proc.wait(10)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)


# -- PgBouncer ----------------------------------------------------------------------


class PgBouncer(Daemon):
    """PgBouncer in ``pool_mode`` in front of ``cluster``.

    ``databases`` maps a PgBouncer database name to the real database and the
    role the server connections log in as (``{"app": {"dbname": "x", "user":
    "r"}}``); ``users`` maps client user names to their passwords. The admin
    console (database ``pgbouncer``) is open to :attr:`admin_user`.
    """

    name = "pgbouncer"
    stop_signal = signal.SIGTERM  # immediate shutdown (SIGINT waits for clients)

    def __init__(
        self,
        cluster: TemporaryCluster,
        *,
        pool_mode: str,
        pool_size: int,
        databases: Mapping[str, Mapping[str, str]],
        users: Mapping[str, str],
        ignore_startup_parameters: str = "",
    ) -> None:
        super().__init__(cluster)
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        self.databases = dict(databases)
        self.admin_user = "pgb_admin"
        self.users = {**users, self.admin_user: secrets.token_urlsafe(18)}
        self.ignore_startup_parameters = ignore_startup_parameters

    def start(self) -> PgBouncer:
        exe = require_program("pgbouncer", "pgbouncer")
        self.port = free_port(exclude=[self.cluster.port])
        lines = ["[databases]"]
        for alias, target in self.databases.items():
            params = {
                "host": str(self.cluster.socket_dir),  # trust: no secret needed server-side
                "port": str(self.cluster.port),
                **target,
            }
            conninfo = " ".join(f"{key}={_quote_ini(value)}" for key, value in params.items())
            lines.append(f"{alias} = {conninfo}")
        lines += [
            "[pgbouncer]",
            f"listen_addr = {LOOPBACK}",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = scram-sha-256",
            f"auth_file = {self.workdir / 'userlist.txt'}",
            f"admin_users = {self.admin_user}",
            f"stats_users = {self.admin_user}",
            f"pool_mode = {self.pool_mode}",
            f"default_pool_size = {self.pool_size}",
            "min_pool_size = 0",
            "reserve_pool_size = 0",
            f"max_db_connections = {self.pool_size}",
            "max_client_conn = 500",
            "server_check_delay = 0",
            "log_connections = 0",
            "log_disconnections = 0",
            "application_name_add_host = 0",
            f"ignore_startup_parameters = {self.ignore_startup_parameters}",
            f"pidfile = {self.workdir / 'pgbouncer.pid'}",
            "",
        ]
        self.write("pgbouncer.ini", "\n".join(lines))
        self.write(
            "userlist.txt",
            "".join(f'"{user}" "{password}"\n' for user, password in self.users.items()),
        )
        self.launch([exe, str(self.workdir / "pgbouncer.ini")])
        self.wait_ready(self.admin_dsn())
        return self

    def dsn(self, dbname: str, user: str, **params: Any) -> str:
        """Connection string for a client of PgBouncer (TCP, scram)."""
        return psycopg2.extensions.make_dsn(
            host=LOOPBACK,
            port=self.port,
            dbname=dbname,
            user=user,
            password=self.users[user],
            **params,
        )

    def admin_dsn(self) -> str:
        return self.dsn("pgbouncer", self.admin_user)

    @contextlib.contextmanager
    def console(self) -> Iterator[psycopg2.extensions.connection]:
        """A connection to the admin console (database ``pgbouncer``)."""
        conn = psycopg2.connect(self.admin_dsn(), connect_timeout=5)
        try:
            conn.autocommit = True  # the console refuses BEGIN
            yield conn
        finally:
            conn.close()

    def show(
        self, what: str, console: psycopg2.extensions.connection | None = None
    ) -> list[dict[str, Any]]:
        """``SHOW what`` on the admin console, as a list of column -> value dicts."""
        if not what.replace("_", "").isalpha():
            raise ValueError(what)
        if console is None:
            with self.console() as conn:
                return self.show(what, conn)
        with console.cursor() as cur:
            cur.execute(f"SHOW {what}")
            names = [col.name for col in cur.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def pool(
        self, database: str, console: psycopg2.extensions.connection | None = None
    ) -> dict[str, Any]:
        """The ``SHOW POOLS`` row of ``database``."""
        for row in self.show("POOLS", console):
            if row["database"] == database:
                return row
        return {}


# -- pgpool-II ------------------------------------------------------------------------


class PgPool(Daemon):
    """pgpool-II in raw mode with connection caching: a plain connection pooler.

    No load balancing, no replication, no failover: one backend, reached over
    the cluster's unix socket. Clients log in with scram-sha-256 against
    ``pool_passwd`` (plain text, ``TEXT`` prefix); a client is served by one
    pgpool child at a time, which keeps up to ``max_pool`` cached backend
    connections.
    """

    name = "pgpool"
    stop_signal = signal.SIGINT  # fast shutdown (SIGTERM waits for clients)

    def __init__(
        self,
        cluster: TemporaryCluster,
        *,
        users: Mapping[str, str],
        children: int = 8,
        max_pool: int = 2,
    ) -> None:
        super().__init__(cluster)
        self.users = dict(users)
        self.children = children
        self.max_pool = max_pool

    def start(self) -> PgPool:
        exe = require_program("pgpool", "pgpool2")
        self.port = free_port(exclude=[self.cluster.port])
        pcp_port = free_port(exclude=[self.cluster.port, self.port])
        work = self.workdir
        settings: dict[str, object] = {
            "backend_clustering_mode": "raw",
            "listen_addresses": LOOPBACK,
            "port": self.port,
            "socket_dir": work,
            "pcp_listen_addresses": "",  # no TCP for the control port
            "pcp_port": pcp_port,
            "pcp_socket_dir": work,
            "wd_ipc_socket_dir": work,
            "backend_hostname0": self.cluster.socket_dir,
            "backend_port0": self.cluster.port,
            "backend_weight0": 1,
            "backend_flag0": "DISALLOW_TO_FAILOVER",
            "backend_data_directory0": self.cluster.data_dir,
            "enable_pool_hba": "on",
            "pool_passwd": work / "pool_passwd",
            "allow_clear_text_frontend_auth": "off",
            "num_init_children": self.children,
            "max_pool": self.max_pool,
            "reserved_connections": 0,
            "child_life_time": 0,
            "connection_life_time": 0,
            "client_idle_limit": 0,
            "connection_cache": "on",
            "load_balance_mode": "off",
            "replicate_select": "off",
            "memory_cache_enabled": "off",
            "enable_shared_relcache": "off",
            "use_watchdog": "off",
            "health_check_period": 0,
            "sr_check_period": 0,
            "failover_on_backend_error": "off",
            "log_destination": "stderr",
            "logging_collector": "off",
            "log_min_messages": "warning",
            "logdir": work,
            "pid_file_name": work / "pgpool.pid",
        }
        conf = "".join(
            f"{key} = {value if isinstance(value, int) else _quote_ini(value)}\n"
            for key, value in settings.items()
        )
        self.write("pgpool.conf", conf)
        self.write("pcp.conf", "")
        self.write(
            "pool_hba.conf",
            "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n",
        )
        self.write(
            "pool_passwd",
            "".join(f"{user}:TEXT{password}\n" for user, password in self.users.items()),
        )
        self.launch(
            [
                exe,
                "-n",
                "-D",
                "-f",
                str(work / "pgpool.conf"),
                "-F",
                str(work / "pcp.conf"),
                "-a",
                str(work / "pool_hba.conf"),
                "-k",
                str(work / ".pgpoolkey"),
            ]
        )
        user = next(iter(self.users))
        self.wait_ready(self.dsn(self.cluster.dbname, user))
        return self

    def dsn(self, dbname: str, user: str, **params: Any) -> str:
        return psycopg2.extensions.make_dsn(
            host=LOOPBACK,
            port=self.port,
            dbname=dbname,
            user=user,
            password=self.users[user],
            **params,
        )


# -- primaries and standbys ---------------------------------------------------------------

#: postgresql.conf of every node: a throwaway, tuned for speed, not durability.
NODE_SETTINGS = {
    "listen_addresses": f"'{LOOPBACK}'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "100",
    "shared_buffers": "16MB",
    "min_wal_size": "4MB",  # 1 MB segments (initdb --wal-segsize=1): small copies
    "max_wal_size": "64MB",
    "password_encryption": "'scram-sha-256'",
    "log_line_prefix": "'%m [%p] '",
}


def _node_account() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root, but there is no postgres (or nobody) OS user")


class Node:
    """A PostgreSQL server in a temporary directory of its own, on its own port and socket.

    :meth:`initdb` makes a new cluster (1 MB WAL segments, so copies stay
    small); :meth:`copy_of` starts from a copy of a stopped node (much faster
    than initdb); :meth:`standby_of` takes a ``pg_basebackup -R`` of a running
    node, which makes it a hot standby streaming from it. Copies share the
    role ``postgres`` and its password. TCP connections use scram-sha-256;
    the unix socket, in a directory only the node's OS user can enter, is
    trusted (replication included). Runs as the ``postgres`` OS user when we
    are root.
    """

    user = "postgres"

    def __init__(self, password: str) -> None:
        self.password = password
        self.bindir = find_bindir()
        self.account = _node_account()
        self.root = Path(tempfile.mkdtemp(prefix="wsgi_pgconn-node-"))
        os.chmod(self.root, 0o755)  # noqa: S103 - the postgres user must enter it
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log_path = self.root / "postgres.log"
        self.port = 0
        self.socket_dir.mkdir(mode=0o700)
        self.log_path.touch(mode=0o600)
        for path in (self.root, self.socket_dir, self.log_path):
            self._own(path)

    @classmethod
    def initdb(cls) -> Node:
        node = cls(secrets.token_urlsafe(18))
        try:
            pwfile = node.root / "pwfile"
            fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(node.password + "\n")
            node._own(pwfile)
            node._run(
                "initdb",
                "-D", str(node.data_dir),
                "-U", node.user,
                "-E", "UTF8",
                "--locale=C",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                f"--pwfile={pwfile}",
                "--wal-segsize=1",
                "--no-sync",
                "--no-instructions",
            )  # fmt: skip
            pwfile.unlink()
            with open(node.data_dir / "postgresql.conf", "a", encoding="utf-8") as fh:
                fh.write("".join(f"{k} = {v}\n" for k, v in NODE_SETTINGS.items()))
                fh.write("include 'node.conf'\n")
            node._configure()
        except BaseException:
            node.cleanup()
            raise
        return node

    @classmethod
    def copy_of(cls, template: Node) -> Node:
        """A new server on a copy of ``template``'s data directory (stopped cleanly)."""
        if (template.data_dir / "postmaster.pid").exists():
            raise RuntimeError("stop the template node before copying it")
        node = cls(template.password)
        try:
            node._copy_tree(template.data_dir, node.data_dir)
            node._configure()
        except BaseException:
            node.cleanup()
            raise
        return node

    @classmethod
    def standby_of(cls, primary: Node) -> Node:
        """A hot standby of the running ``primary`` (pg_basebackup -R over its socket)."""
        node = cls(primary.password)
        try:
            node._run(
                "pg_basebackup",
                "-D", str(node.data_dir),
                "-R",  # standby.signal and primary_conninfo
                "-X", "stream",
                "-c", "fast",
                "--no-sync",  # a throwaway copy, like fsync=off
                "-h", str(primary.socket_dir),
                "-p", str(primary.port),
                "-U", primary.user,
            )  # fmt: skip
            node._configure()
        except BaseException:
            node.cleanup()
            raise
        return node

    def _copy_tree(self, source: Path, target: Path) -> None:
        """``cp -a`` as the owning OS user (keeps modes and ownership in one pass)."""
        cp = find_program("cp")
        if cp is None:
            raise RuntimeError("cp not found")
        argv = [cp, "-a", str(source), str(target)]
        if self.account is not None:
            argv = [_runuser(), "-u", self.account.pw_name, "--", *argv]
        subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=True)

    def _configure(self) -> None:
        """This node's own port and socket (an include file, replaced in copies)."""
        self.port = free_port()
        conf = self.data_dir / "node.conf"
        conf.write_text(
            f"port = {self.port}\nunix_socket_directories = '{self.socket_dir}'\n",
            encoding="utf-8",
        )
        self._own(conf)

    def _own(self, path: Path) -> None:
        if self.account is not None:
            os.chown(path, self.account.pw_uid, self.account.pw_gid, follow_symlinks=False)

    def _run(self, program: str, *args: str, timeout: float = 60) -> str:
        argv = [str(self.bindir / program), *args]
        if self.account is not None:
            argv = [_runuser(), "-u", self.account.pw_name, "--", *argv]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
            env=env,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{program} failed ({result.returncode}): {result.stderr.strip()}\n"
                f"{self.read_log()}"
            )
        return result.stdout

    def start(self) -> Node:
        self._run(
            "pg_ctl", "start", "-w", "-t", "30", "-D", str(self.data_dir), "-l", str(self.log_path)
        )
        return self

    def promote(self) -> None:
        """``pg_ctl promote -w``: end recovery; returns once the node accepts writes."""
        self._run("pg_ctl", "promote", "-w", "-t", "30", "-D", str(self.data_dir))

    def stop(self, mode: str = "fast") -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "stop", "-w", "-t", "30", "-m", mode, "-D", str(self.data_dir))

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-4000:]
        except OSError:
            return ""

    def cleanup(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, dbname: str = "postgres", **params: Any) -> str:
        """TCP connection string (scram-sha-256)."""
        return psycopg2.extensions.make_dsn(
            host=LOOPBACK,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=dbname,
            **params,
        )


def _runuser() -> str:
    runuser = find_program("runuser")
    if runuser is None:
        raise RuntimeError("running as root, but runuser (util-linux) is missing")
    return runuser
