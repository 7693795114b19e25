"""A throwaway PgBouncer in transaction mode in front of the benchmark database.

Set up as a PgBouncer on the application's own machine usually is: the
application connects to PgBouncer's unix socket with ``trust`` (no password
exchange; connecting costs about 0.05 ms), and PgBouncer keeps the server
connections.  The socket lives in a directory of its own that every user can
enter, so that the WSGI servers' unprivileged user (``www-data``, or the
cluster's OS user) can connect; PgBouncer does not listen on TCP.  With
``trust`` PgBouncer still wants the user name in its ``auth_file``.

PgBouncer reaches PostgreSQL over the server's unix socket (trust) when there
is one, else with the credentials of the TCP connection string.  PgBouncer
refuses to run as root, so it is started with ``-u USER`` (the cluster's OS
user, or ``postgres``/``nobody``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from typing import IO

import psycopg2
from psycopg2.extensions import make_dsn, parse_dsn

INSTALL_HINT = "apt-get install pgbouncer"
#: PgBouncer's port: only the name of its socket (``.s.PGSQL.6432``) in a private directory.
PORT = 6432


def pgbouncer_path() -> str | None:
    found = shutil.which("pgbouncer")
    if found:
        return found
    return "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None


def _quote(value: object) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _account(preferred: str | None) -> pwd.struct_passwd:
    for name in (preferred, "postgres", "nobody"):
        if not name:
            continue
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("no unprivileged user to run pgbouncer as")


class PgBouncer:
    """PgBouncer in transaction mode; :meth:`dsn` is how clients reach it (unix socket, trust)."""

    def __init__(
        self, target_dsn: str, pool_size: int, application_name: str, os_user: str | None = None
    ) -> None:
        self.target = parse_dsn(target_dsn)
        self.pool_size = pool_size
        self.application_name = application_name
        self.os_user = os_user
        self.port = PORT
        self.user = "bench"
        self.workdir = ""  # private: configuration, auth_file, log
        self.socket_dir = ""  # world-enterable: the socket only
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def dsn(self) -> str:
        dsn: str = make_dsn(
            host=self.socket_dir,
            port=self.port,
            dbname="bench",
            user=self.user,
            application_name=self.application_name,
        )
        return dsn

    def _config(self) -> str:
        keys = ("host", "port", "dbname", "user", "password")
        server = {k: v for k, v in self.target.items() if k in keys}
        server["application_name"] = self.application_name
        db_line = " ".join(f"{k}={_quote(v)}" for k, v in server.items())
        return "\n".join(
            [
                "[databases]",
                "bench = " + db_line,
                "[pgbouncer]",
                # No listen_addr: no TCP, the unix socket only.
                f"listen_port = {self.port}",
                "unix_socket_dir = " + self.socket_dir,
                "unix_socket_mode = 0777",
                "auth_type = trust",
                "auth_file = " + os.path.join(self.workdir, "userlist.txt"),
                "pool_mode = transaction",
                f"default_pool_size = {self.pool_size}",
                "max_client_conn = 1000",
                "application_name_add_host = 0",
                "ignore_startup_parameters = extra_float_digits",
                "pidfile = " + os.path.join(self.workdir, "pgbouncer.pid"),
                "",
            ]
        )

    def start(self, timeout: float = 15.0) -> PgBouncer:
        exe = pgbouncer_path()
        if exe is None:
            raise RuntimeError(f"pgbouncer not found: {INSTALL_HINT}")
        self.workdir = tempfile.mkdtemp(prefix="wsgi-pgconn-pgbouncer-")
        # Enterable by everyone (the WSGI servers' user), writable by PgBouncer only.
        self.socket_dir = tempfile.mkdtemp(prefix="wsgi-pgconn-pgbouncer-socket-")
        os.chmod(self.socket_dir, 0o755)  # noqa: S103 - clients of any user reach the socket
        root = os.geteuid() == 0
        account = _account(self.os_user)
        files = {
            "pgbouncer.ini": self._config(),
            "userlist.txt": f'"{self.user}" ""\n',  # trust: the name must be listed
        }
        for name, content in files.items():
            path = os.path.join(self.workdir, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(content)
            if root:
                os.chown(path, account.pw_uid, account.pw_gid)
        if root:
            os.chown(self.workdir, account.pw_uid, account.pw_gid)
            os.chown(self.socket_dir, account.pw_uid, account.pw_gid)
        argv = [
            exe,
            *(["-u", account.pw_name] if root else []),
            os.path.join(self.workdir, "pgbouncer.ini"),
        ]
        self._log = open(os.path.join(self.workdir, "pgbouncer.log"), "ab")  # noqa: SIM115 - open while it runs
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"pgbouncer exited with {self.proc.returncode}: {self.log_tail()}"
                )
            try:
                conn = psycopg2.connect(self.dsn(), connect_timeout=2)
            except psycopg2.OperationalError as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    reason = str(exc).strip()
                    raise RuntimeError(
                        f"pgbouncer not ready: {reason}\n{self.log_tail()}"
                    ) from None
                time.sleep(0.05)
            else:
                conn.close()
                return self

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(
                os.path.join(self.workdir, "pgbouncer.log"), encoding="utf-8", errors="replace"
            ) as f:
                return "\n".join(f.read().splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        self.stop()
        for directory in (self.workdir, self.socket_dir):
            if directory:
                shutil.rmtree(directory, ignore_errors=True)
