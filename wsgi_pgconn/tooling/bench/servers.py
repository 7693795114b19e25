"""Start real WSGI servers on loopback: mod_wsgi-express, gunicorn, uWSGI, waitress, werkzeug.

Shared by the benchmark and by ``tests/servers``.  The servers' Python comes
from the virtualenv that ``.ci/install-servers.sh`` builds (default
``/opt/wsgi-pgconn-servers``, or ``$WSGI_PGCONN_SERVER_VENV``).  The code
they serve is a world-readable copy of the working tree made by
:func:`stage`, so that an unprivileged daemon user can import it even when
the checkout lives under ``/root``.
"""

from __future__ import annotations

import contextlib
import grp
import http.client
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import IO

from wsgi_pgconn.tooling.ports import free_port

__all__ = [
    "DAEMON_USER",
    "DEFAULT_VENV",
    "INSTALL_HINT",
    "Server",
    "ServerError",
    "free_port",
    "gunicorn_python",
    "gunicorn_server",
    "http_get",
    "make_world_readable",
    "mod_wsgi_express",
    "mod_wsgi_server",
    "package_dir",
    "python_has",
    "server_venv",
    "stage",
    "uwsgi_server",
    "venv_python",
    "venv_tool",
    "waitress_server",
    "werkzeug_server",
]

DEFAULT_VENV = "/opt/wsgi-pgconn-servers"
INSTALL_HINT = "bash .ci/install-servers.sh"
DAEMON_USER = "www-data"


class ServerError(RuntimeError):
    """A server did not start, or died."""


def server_venv() -> str:
    return os.environ.get("WSGI_PGCONN_SERVER_VENV") or DEFAULT_VENV


def venv_tool(name: str) -> str | None:
    """Path of ``name`` in the servers' venv, or None."""
    path = os.path.join(server_venv(), "bin", name)
    return path if os.access(path, os.X_OK) else None


def venv_python() -> str | None:
    return venv_tool("python")


def python_has(python: str | None, module: str) -> bool:
    """Whether ``python`` can import ``module`` (checked in a subprocess)."""
    if python is None:
        return False
    result = subprocess.run(
        [python, "-c", "import " + module],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    return result.returncode == 0


def mod_wsgi_express() -> str | None:
    """Path of a usable mod_wsgi-express, or None.

    Only the venv's copy is used when running as root: its Python is
    readable by the daemon user, which a pyenv Python under /root is not.
    """
    tool = venv_tool("mod_wsgi-express")
    if tool:
        return tool
    if os.geteuid() != 0:
        return shutil.which("mod_wsgi-express")
    return None


def gunicorn_python() -> str | None:
    """A Python that can run gunicorn (the venv's first), or None."""
    python = venv_python()
    if python_has(python, "gunicorn"):
        return python
    if python_has(sys.executable, "gunicorn"):
        return sys.executable
    return None


def _ignore_junk(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "__pycache__" or n.endswith((".pyc", ".pyo"))]


def stage(sources: Iterable[str | tuple[str, str]], parent: str | None = None) -> str:
    """Copy ``sources`` into a new world-readable folder and return its path.

    Each source is a file or folder path, or a ``(path, name)`` pair to copy
    it under another name.  The caller removes the folder (``shutil.rmtree``).
    """
    root = tempfile.mkdtemp(prefix="wsgi-pgconn-stage-", dir=parent)
    for source in sources:
        src, name = (
            source
            if isinstance(source, tuple)
            else (source, os.path.basename(os.path.normpath(source)))
        )
        dest = os.path.join(root, name)
        if os.path.isdir(src):
            shutil.copytree(src, dest, ignore=_ignore_junk)
        else:
            shutil.copy2(src, dest)
    make_world_readable(root)
    return root


def make_world_readable(root: str) -> None:
    """Let the servers' unprivileged user read (not write) everything under ``root``."""
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)  # noqa: S103 - meant to be readable by the daemon user
        for name in filenames:
            path = os.path.join(dirpath, name)
            os.chmod(path, os.stat(path).st_mode | 0o444)


def package_dir() -> str:
    """The folder of the wsgi_pgconn package being run."""
    import wsgi_pgconn

    return os.path.dirname(os.path.abspath(wsgi_pgconn.__file__))


def http_get(
    port: int,
    path: str = "/",
    timeout: float = 5.0,
    method: str = "GET",
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection; returns (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, dict(resp.getheaders()), data
    finally:
        conn.close()


class Server:
    """A server process in its own session (process group), logging to a file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        port: int,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.env = dict(env) if env is not None else None
        self.workdir = tempfile.mkdtemp(prefix=f"wsgi-pgconn-{name}-")
        os.chmod(self.workdir, 0o755)  # noqa: S103 - the daemon user writes its sockets below
        self.cwd = cwd or self.workdir
        self.log_path = os.path.join(self.workdir, "server.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(
        self, ready_path: str = "/", timeout: float = 30.0, ready_status: int | None = None
    ) -> Server:
        """Start and poll ``ready_path`` until it answers (``ready_status`` if given)."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - open while the server runs
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        last: object = None
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                tail = self.log_tail()
                raise ServerError(f"{self.name} exited with {code} before serving:\n{tail}")
            try:
                status, _, _ = http_get(
                    self.port, ready_path, timeout=max(0.5, deadline - time.monotonic())
                )
            except (OSError, http.client.HTTPException) as exc:
                last = exc
            else:
                if ready_status is None or status == ready_status:
                    return self
                last = f"HTTP {status}"
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(
                    f"{self.name} not ready after {timeout:.0f} s ({last}):\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the server's process group; SIGKILL after ``timeout`` s."""
        if self.proc is not None:
            pgid = self.proc.pid
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pgid, signal.SIGKILL)
                    self.proc.wait()
            # Children (mod_wsgi daemon processes, gunicorn workers) may
            # outlive the parent for a moment: wait for the group to empty.
            deadline = time.monotonic() + timeout
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _group_alive(pgid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None

    def read_log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.read_log().splitlines()[-lines:])

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Server:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mod_wsgi_server(
    target: str,
    *,
    port: int | None = None,
    processes: int = 2,
    threads: int = 4,
    python_path: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    setenv: Mapping[str, str] | None = None,
    maximum_requests: int | None = None,
    application_type: str | None = None,
    user: str | None = None,
    extra_args: Sequence[str] = (),
    name: str = "mod_wsgi",
) -> Server:
    """A :class:`Server` running ``mod_wsgi-express start-server`` in daemon mode.

    ``target`` is a WSGI script path or, with ``application_type="module"``,
    a module name.  ``setenv`` values reach only the per-request environ (as
    with Apache's SetEnv); ``env`` is the server's process environment.
    When run as root the daemon processes run as ``user`` (default
    ``www-data``).
    """
    express = mod_wsgi_express()
    if express is None:
        raise ServerError(f"mod_wsgi-express not found: run {INSTALL_HINT}")
    port = port or free_port()
    server = Server(name, [], port, env=env)
    argv = [
        express,
        "start-server",
        target,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--processes",
        str(processes),
        "--threads",
        str(threads),
        "--server-root",
        os.path.join(server.workdir, "root"),
        "--log-to-terminal",
        "--locale",
        "C.UTF-8",
        "--shutdown-timeout",
        "10",
    ]
    if application_type:
        argv += ["--application-type", application_type]
    if os.geteuid() == 0:
        account = pwd.getpwnam(user or DAEMON_USER)
        argv += ["--user", account.pw_name, "--group", grp.getgrgid(account.pw_gid).gr_name]
    for path in python_path:
        argv += ["--python-path", path]
    for key, value in (setenv or {}).items():
        argv += ["--setenv", key, str(value)]
    if maximum_requests:
        argv += ["--maximum-requests", str(maximum_requests)]
    argv += list(extra_args)
    server.argv = argv
    return server


def gunicorn_server(
    target: str,
    *,
    port: int | None = None,
    workers: int = 2,
    threads: int = 1,
    worker_class: str | None = None,
    python_path: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    preload: bool = False,
    extra_args: Sequence[str] = (),
    name: str = "gunicorn",
) -> Server:
    """A :class:`Server` running gunicorn; ``target`` is ``module:callable``."""
    python = gunicorn_python()
    if python is None:
        raise ServerError(f"gunicorn not found: run {INSTALL_HINT}")
    port = port or free_port()
    argv = [
        python,
        "-m",
        "gunicorn",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--no-control-socket",
        "--graceful-timeout",
        "10",
        "--log-level",
        "warning",
    ]
    if worker_class:
        argv += ["--worker-class", worker_class]
    if threads > 1 or worker_class == "gthread":
        argv += ["--threads", str(threads)]
    if python_path:
        argv += ["--pythonpath", ",".join(python_path)]
    if preload:
        argv.append("--preload")
    argv += [*extra_args, target]
    return Server(name, argv, port, env=env)


WERKZEUG_SNIPPET = """
import importlib, sys
from werkzeug.serving import run_simple
module, _, attr = sys.argv[2].partition(":")
app = getattr(importlib.import_module(module), attr or "application")
run_simple("127.0.0.1", int(sys.argv[1]), app, threaded=True)
"""


def werkzeug_server(
    target: str,
    *,
    port: int | None = None,
    python_path: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    name: str = "werkzeug",
    python: str | None = None,
) -> Server:
    """A :class:`Server` running werkzeug's threaded development server.

    It starts a new thread for every request, so per-thread connections
    last one request there. ``python`` runs it (default: this interpreter;
    the servers' venv's has werkzeug too).
    """
    port = port or free_port()
    return Server(
        name,
        [python or sys.executable, "-c", WERKZEUG_SNIPPET, str(port), target],
        port,
        env=_with_python_path(env, python_path),
    )


def _with_python_path(env: Mapping[str, str] | None, python_path: Sequence[str]) -> dict[str, str]:
    environ = dict(os.environ if env is None else env)
    if python_path:
        environ["PYTHONPATH"] = os.pathsep.join(
            [*python_path, environ.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep)
    return environ


def uwsgi_server(
    target: str,
    *,
    port: int | None = None,
    processes: int = 2,
    threads: int = 1,
    gevent: int | None = None,
    gevent_monkey_patch: bool = False,
    lazy_apps: bool = False,
    max_requests: int | None = None,
    python_path: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    name: str = "uwsgi",
) -> Server:
    """A :class:`Server` running uWSGI (from the servers' venv) with a master process.

    ``target`` is ``module:callable``. ``threads`` > 1 runs that many threads
    per process; ``gevent`` runs uWSGI's gevent loop with that many async
    cores (monkey-patching only with ``gevent_monkey_patch``). Without
    ``lazy_apps`` the master loads the application and forks the workers.
    ``--die-on-term`` makes SIGTERM (what docker and systemd send) shut
    uWSGI down, as uWSGI 2.1 does by default (2.0 reloads on SIGTERM).
    """
    tool = venv_tool("uwsgi")
    if tool is None:
        raise ServerError(f"uwsgi not found: run {INSTALL_HINT}")
    port = port or free_port()
    module, _, attr = target.partition(":")
    argv = [
        tool,
        "--http-socket",
        f"127.0.0.1:{port}",
        "--master",
        "--processes",
        str(processes),
        "--module",
        f"{module}:{attr or 'application'}",
        "--die-on-term",
        "--need-app",
        "--disable-logging",
        "--strict",
    ]
    if threads > 1:
        argv += ["--threads", str(threads)]
    if gevent:
        argv += ["--gevent", str(gevent)]
        if gevent_monkey_patch:
            argv.append("--gevent-monkey-patch")
    if lazy_apps:
        argv.append("--lazy-apps")
    if max_requests:
        # A worker younger than --min-worker-lifetime (10 s by default) is not recycled.
        argv += ["--max-requests", str(max_requests), "--min-worker-lifetime", "1"]
    for path in python_path:
        argv += ["--pythonpath", path]
    argv += list(extra_args)
    return Server(name, argv, port, env=env)


def waitress_server(
    target: str,
    *,
    port: int | None = None,
    threads: int = 4,
    python_path: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    name: str = "waitress",
) -> Server:
    """A :class:`Server` running ``waitress-serve`` (one process, ``threads`` threads).

    waitress-serve leaves SIGTERM at its default: the process dies without
    running ``atexit`` (wsgi_pgconn closes its idle connections first).
    """
    tool = venv_tool("waitress-serve")
    if tool is None:
        raise ServerError(f"waitress-serve not found: run {INSTALL_HINT}")
    port = port or free_port()
    argv = [
        tool,
        f"--listen=127.0.0.1:{port}",
        f"--threads={threads}",
        *extra_args,
        target,
    ]
    return Server(name, argv, port, env=_with_python_path(env, python_path))
