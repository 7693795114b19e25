"""Tests for wsgi_pgconn.tooling.tempdb against real PostgreSQL clusters (no mocks)."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from wsgi_pgconn.tooling.ports import PORT_RANGE_ENV, bind_free_port, port_range
from wsgi_pgconn.tooling.tempdb import BINDIR_ENV, TempClusterError, TemporaryCluster, find_bindir

pytestmark = pytest.mark.cluster_only("starts throwaway clusters of its own")

REPO = Path(__file__).resolve().parent.parent
QUOTED_NAME = "it's a \\ test"  # exercises postgresql.conf quoting


def query(dsn: str, statement: str = "SELECT 1") -> object:
    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
            row = cur.fetchone()
    finally:
        conn.close()
    assert row is not None
    return row[0]


def postmaster_pid(cluster: TemporaryCluster) -> int:
    with open(cluster.data_dir / "postmaster.pid", encoding="ascii") as fh:
        return int(fh.readline())


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"  # not yet reaped
    except FileNotFoundError:
        return True


def process_uid(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[TemporaryCluster]:
    settings = {
        "work_mem": "8MB",
        "application_name": QUOTED_NAME,
        "shared_preload_libraries": "'pg_stat_statements'",  # already quoted: kept as is
    }
    with TemporaryCluster(settings=settings) as c:
        yield c


def test_find_bindir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(BINDIR_ENV, raising=False)
    bindir = find_bindir()
    for program in ("initdb", "pg_ctl", "postgres"):
        assert os.access(bindir / program, os.X_OK)

    monkeypatch.setenv(BINDIR_ENV, str(bindir))
    assert find_bindir() == bindir

    monkeypatch.setenv(BINDIR_ENV, str(tmp_path))
    with pytest.raises(TempClusterError, match=BINDIR_ENV):
        find_bindir()


def test_tcp_connection_uses_scram_password(cluster: TemporaryCluster) -> None:
    assert cluster.host == "127.0.0.1"
    assert cluster.user == "postgres"
    assert cluster.dbname == "postgres"
    assert query(cluster.dsn()) == 1
    assert query(cluster.url()) == 1
    assert query(cluster.dsn(), "SELECT host(inet_server_addr())") == "127.0.0.1"
    verifier = query(cluster.dsn(), "SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'")
    assert isinstance(verifier, str)
    assert verifier.startswith("SCRAM-SHA-256$")


def test_wrong_or_missing_password_is_rejected(cluster: TemporaryCluster) -> None:
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(cluster.dsn(password="wrong-" + cluster.password))
    no_password = f"host={cluster.host} port={cluster.port} user=postgres dbname=postgres"
    with pytest.raises(psycopg2.OperationalError, match="password"):
        psycopg2.connect(no_password, passfile=os.devnull, connect_timeout=5)


def test_unix_socket_uses_trust(cluster: TemporaryCluster) -> None:
    dsn = cluster.dsn(tcp=False)
    assert cluster.password not in dsn
    assert f"host={cluster.socket_dir}" in dsn
    assert query(dsn, "SELECT inet_server_addr()") is None  # i.e. a unix socket
    url = cluster.url(tcp=False, dbname="postgres", application_name="via url")
    assert url.startswith("postgresql://postgres@/postgres?host=/")
    assert query(url, "SELECT current_setting('application_name')") == "via url"
    assert (cluster.socket_dir / f".s.PGSQL.{cluster.port}").is_socket()
    assert len(str(cluster.socket_dir / f".s.PGSQL.{cluster.port}")) < 104


def test_server_settings(cluster: TemporaryCluster) -> None:
    first, last = port_range()
    assert first <= cluster.port <= last
    dsn = cluster.dsn(tcp=False)
    expected = {
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "200",
        "logging_collector": "off",
        "listen_addresses": "127.0.0.1",
        "server_encoding": "UTF8",
        "lc_collate": "C",
        "work_mem": "8MB",
        "application_name": QUOTED_NAME,
        "shared_preload_libraries": "pg_stat_statements",
    }
    for name, value in expected.items():
        assert query(dsn, f"SHOW {name}") == value, name


def test_port_range_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:
        first = bind_free_port(probe)  # free: bound, never listened on, closed
    monkeypatch.setenv(PORT_RANGE_ENV, f"{first}-{first}")  # a range of one port
    with TemporaryCluster() as narrow:
        assert narrow.port == first
        assert query(narrow.dsn()) == 1


def test_invalid_port_range_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PORT_RANGE_ENV, "29999-20000")
    cluster = TemporaryCluster()
    with pytest.raises(TempClusterError, match=r"PORT_RANGE='29999-20000' is not valid"):
        cluster.start()
    assert cluster.removed


def test_password_is_never_exposed(cluster: TemporaryCluster) -> None:
    password = cluster.password
    assert len(password) >= 24
    assert password in cluster.dsn()
    assert password not in repr(cluster)
    assert password not in str(cluster)
    assert password not in cluster.url(tcp=False)
    assert password not in cluster.read_log()
    assert "running" in repr(cluster)
    assert not (cluster.directory / "pwfile").exists()


def test_files_and_processes_belong_to_an_unprivileged_user(cluster: TemporaryCluster) -> None:
    pid = postmaster_pid(cluster)
    uid = process_uid(pid)
    if os.geteuid() == 0:
        assert cluster.os_user == "postgres"  # exists on the CI image
        assert uid != 0
        assert cluster.data_dir.stat().st_uid == uid
        assert cluster.socket_dir.stat().st_uid == uid
    else:
        assert cluster.os_user is None
        assert uid == os.geteuid()
    assert stat.S_IMODE(cluster.socket_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(cluster.directory.stat().st_mode) == 0o755
    log = cluster.read_log()
    assert cluster.log_path.is_file()
    assert "database system is ready to accept connections" in log
    assert f"[{pid}] LOG:" in log  # log_line_prefix '%m [%p] '


def test_create_database(cluster: TemporaryCluster) -> None:
    cluster.create_database("app db")
    assert query(cluster.dsn(dbname="app db"), "SELECT current_database()") == "app db"
    assert query(cluster.url(dbname="app db"), "SELECT current_database()") == "app db"
    with pytest.raises(psycopg2.errors.DuplicateDatabase):
        cluster.create_database("app db")


def test_restart_immediate(cluster: TemporaryCluster) -> None:
    before = postmaster_pid(cluster)
    cluster.restart("immediate")
    assert cluster.is_running()
    assert postmaster_pid(cluster) != before
    assert query(cluster.dsn()) == 1
    assert "not properly shut down" in cluster.read_log()
    cluster.restart()  # fast
    assert query(cluster.dsn(tcp=False)) == 1


def test_stop_and_start_again(cluster: TemporaryCluster) -> None:
    identity = (cluster.directory, cluster.port, cluster.password, cluster.dsn())
    conn = psycopg2.connect(cluster.dsn())
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
    finally:
        conn.close()

    cluster.stop()
    assert not cluster.is_running()
    assert "stopped" in repr(cluster)
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(cluster.dsn(), connect_timeout=5)
    cluster.stop()  # stopping a stopped cluster is a no-op

    cluster.start()
    assert cluster.is_running()
    assert (cluster.directory, cluster.port, cluster.password, cluster.dsn()) == identity
    assert query(cluster.dsn(), "SELECT v FROM kept") == 42
    cluster.start()  # starting a running cluster is a no-op


def test_cleanup_removes_everything() -> None:
    c = TemporaryCluster()
    seen: list[tuple[Path, int]] = []

    def crash_inside_with_block() -> None:
        with c:
            assert c.is_running()
            seen.append((c.directory, postmaster_pid(c)))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        crash_inside_with_block()
    [(directory, pid)] = seen
    assert not directory.exists()
    assert process_gone(pid)
    assert not c.is_running()
    assert c.removed
    assert "removed" in repr(c)
    c.cleanup()  # idempotent
    c.stop()
    with pytest.raises(TempClusterError, match="cleaned up"):
        c.start()


def test_failed_start_reports_log_and_cleans_up() -> None:
    with socket.socket() as busy:
        port = bind_free_port(busy)
        busy.listen()
        cluster = TemporaryCluster(port=port)
        with pytest.raises(TempClusterError, match=r"could not bind|already in use") as info:
            cluster.start()
    assert cluster.password not in str(info.value)
    assert cluster.removed
    assert not cluster.directory.exists()


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="managed"):
        TemporaryCluster(settings={"port": "5432"})
    with pytest.raises(ValueError, match="invalid setting name"):
        TemporaryCluster(settings={"work_mem = 1; x": "1"})
    with pytest.raises(ValueError, match="newlines"):
        TemporaryCluster(settings={"application_name": "a\nport = 1"})
    with pytest.raises(ValueError, match="port"):
        TemporaryCluster(port=70000)
    c = TemporaryCluster()
    with pytest.raises(ValueError, match="mode"):
        c.stop("now")
    with pytest.raises(TempClusterError, match="not been started"):
        c.dsn()
    assert repr(c) == "<TemporaryCluster not started>"


def test_base_dir_must_be_reachable_by_the_server_user() -> None:
    with tempfile.TemporaryDirectory() as private:
        os.chmod(private, 0o700)
        cluster = TemporaryCluster(base_dir=Path(private) / "nested")
        if os.geteuid() == 0:
            with pytest.raises(TempClusterError, match="cannot enter"):
                cluster.start()
            assert cluster.removed
            assert list(Path(private, "nested").iterdir()) == []
        else:  # no user switch needed: the caller can enter its own directory
            with cluster:
                assert query(cluster.dsn(tcp=False)) == 1


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_atexit_fallback_and_forked_children() -> None:
    # A forked child that exits must not tear down the parent's cluster; the
    # parent then "crashes" without cleanup() and atexit must remove it.
    result = run_python(
        """
        import os, sys
        from wsgi_pgconn.tooling.tempdb import TemporaryCluster
        c = TemporaryCluster().start()
        pid = int((c.data_dir / "postmaster.pid").read_text().split()[0])
        print(c.directory, pid, flush=True)
        child = os.fork()
        if child == 0:
            sys.exit(0)  # runs atexit handlers in the child
        os.waitpid(child, 0)
        print("running after child exit:", c.is_running(), flush=True)
        raise RuntimeError("simulated crash")
        """
    )
    assert "simulated crash" in result.stderr
    lines = result.stdout.splitlines()
    directory, pid = lines[0].split()
    assert lines[1] == "running after child exit: True"
    assert not Path(directory).exists()
    assert process_gone(int(pid))


def test_help_mentions_the_printed_password() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "wsgi_pgconn.tempdb", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "password" in result.stdout
    assert "--keep" in result.stdout


def test_main_runs_in_foreground_until_sigint() -> None:
    argv = [sys.executable, "-m", "wsgi_pgconn.tempdb", "-c", "application_name=from-main"]
    argv += ["--dbname", "notes"]
    with subprocess.Popen(
        argv,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        watchdog = threading.Timer(60, proc.kill)
        watchdog.start()
        try:
            assert proc.stdout is not None
            assert proc.stderr is not None
            tcp_line = proc.stdout.readline().strip()
            unix_line = proc.stdout.readline().strip()
            banner = proc.stderr.readline()
            while banner and "throwaway PostgreSQL cluster at" not in banner:
                banner = proc.stderr.readline()
            assert tcp_line.startswith("DATABASE_URL=postgresql://postgres:")
            assert unix_line.startswith("DATABASE_URL_UNIX=postgresql://postgres@/")
            assert "Ctrl-C to stop and delete it" in banner
            directory = Path(banner.split(" at ", 1)[1].split(";", 1)[0])
            assert directory.is_dir()

            tcp_url = tcp_line.split("=", 1)[1]
            assert tcp_url.endswith("/notes")  # --dbname: created, and named in the URLs
            assert query(tcp_url, "SHOW application_name") == "from-main"
            assert query(tcp_url, "SELECT current_database()") == "notes"
            assert query(unix_line.split("=", 1)[1], "SELECT current_database()") == "notes"

            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=30)
        finally:
            watchdog.cancel()
    assert proc.returncode == 0
    assert not directory.exists()
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(tcp_url, connect_timeout=5)
