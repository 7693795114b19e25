"""The tooling's layout and shared settings: the port range, its variables, the short commands."""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import wsgi_pgconn
import wsgi_pgconn.tempdb
from wsgi_pgconn.config import ENV_PREFIX, Settings
from wsgi_pgconn.tooling import TOOLING_ENVIRONMENT, tempdb
from wsgi_pgconn.tooling.ports import (
    DEFAULT_PORT_RANGE,
    PORT_RANGE_ENV,
    PortRangeError,
    bind_free_port,
    free_port,
    parse_port_range,
    port_range,
)

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "wsgi_pgconn"
TOOLING_PARTS = ("tooling", "bench.py", "tempdb.py")


# -- the port range ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("20000-29999", (20000, 29999)), (" 1-65535 ", (1, 65535)), ("25000 - 25000", (25000, 25000))],
)
def test_parse_port_range(text: str, expected: tuple[int, int]) -> None:
    assert parse_port_range(text) == expected


@pytest.mark.parametrize(
    "text", ["25000", "a-b", "20000-", "-20000", "0-100", "29999-20000", "20000-65536", "1-2-3"]
)
def test_invalid_port_range_names_the_variable_and_the_form(text: str) -> None:
    with pytest.raises(PortRangeError) as info:
        parse_port_range(text)
    message = str(info.value)
    assert message.startswith(f"{PORT_RANGE_ENV}={text!r} is not valid")
    assert "FIRST-LAST" in message
    assert isinstance(info.value, ValueError)


def test_port_range_default_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PORT_RANGE_ENV, raising=False)
    assert port_range() == DEFAULT_PORT_RANGE == (20000, 29999)
    monkeypatch.setenv(PORT_RANGE_ENV, "")
    assert port_range() == DEFAULT_PORT_RANGE
    monkeypatch.setenv(PORT_RANGE_ENV, "31000-31009")
    assert port_range() == (31000, 31009)
    monkeypatch.setenv(PORT_RANGE_ENV, "nonsense")
    with pytest.raises(PortRangeError, match="nonsense"):
        free_port()


def test_free_ports_stay_in_the_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PORT_RANGE_ENV, "24100-24104")
    assert {free_port() for _ in range(30)} <= set(range(24100, 24105))
    assert free_port(exclude=range(24100, 24104)) == 24104


def test_bind_free_port_owns_the_port_and_reports_exhaustion(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as probe:
        port = bind_free_port(probe)
    monkeypatch.setenv(PORT_RANGE_ENV, f"{port}-{port}")
    with socket.socket() as holder:
        assert bind_free_port(holder) == port
        holder.listen(1)
        with pytest.raises(PortRangeError, match=f"no free TCP port on 127.0.0.1 in {port}-{port}"):
            free_port()
        with socket.socket() as other, pytest.raises(PortRangeError, match=PORT_RANGE_ENV):
            bind_free_port(other)


# -- the environment variables of the tooling ---------------------------------------------------


def _files_read_by_the_tooling() -> list[Path]:
    files = [PACKAGE / "bench.py", PACKAGE / "tempdb.py", REPO / "dev", REPO / ".ci" / "run"]
    files += sorted((PACKAGE / "tooling").rglob("*.py"))
    for folder in ("tests", "examples", "scripts", "benchmarks"):
        files += sorted((REPO / folder).rglob("*.py"))
    files += sorted((REPO / ".ci").glob("*.sh"))
    return [f for f in files if f.is_file()]


def test_every_tooling_variable_is_listed() -> None:
    library = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings) if f.name != "dsn"}
    found: dict[str, str] = {}
    for path in _files_read_by_the_tooling():
        for name in re.findall(r"\bWSGI_PGCONN_[A-Z][A-Z0-9_]*[A-Z0-9]\b", path.read_text()):
            found.setdefault(name, str(path.relative_to(REPO)))
    known = library | set(TOOLING_ENVIRONMENT)
    unlisted = {name: where for name, where in found.items() if name not in known}
    assert not unlisted, f"add to wsgi_pgconn.tooling.TOOLING_ENVIRONMENT: {unlisted}"
    assert not set(TOOLING_ENVIRONMENT) & library  # none of them is a middleware setting
    assert len(set(TOOLING_ENVIRONMENT)) == len(TOOLING_ENVIRONMENT)
    assert {PORT_RANGE_ENV, tempdb.BINDIR_ENV, "WSGI_PGCONN_TEST_DSN"} <= set(TOOLING_ENVIRONMENT)


def test_the_library_knows_the_tooling_variables_are_not_settings() -> None:
    """The library's list (it never imports the tooling) and the tooling's are the same."""
    from wsgi_pgconn.config import NOT_SETTINGS, unknown_variables

    assert set(TOOLING_ENVIRONMENT) == NOT_SETTINGS
    assert unknown_variables(dict.fromkeys(TOOLING_ENVIRONMENT, "x")) == []


# -- the layout: the library never imports the tooling ------------------------------------------


def _core_modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in TOOLING_PARTS:
            continue
        parts = ["wsgi_pgconn", *relative.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def test_the_library_never_imports_the_tooling() -> None:
    modules = _core_modules()
    assert "wsgi_pgconn.middleware" in modules
    assert "wsgi_pgconn.django" in modules
    for name in modules:
        path = PACKAGE.joinpath(*name.split(".")[1:])
        source = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom):
                targets = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                assert not re.search(r"(^|\.)(tooling|bench|tempdb)(\.|$)", target), (name, target)
    # and at run time, importing all of it loads none of the tooling
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError as exc:  # an optional driver's package\n"
        "        if (exc.name or '').startswith('wsgi_pgconn'):\n"
        "            raise\n"
        "loaded = [m for m in sys.modules if m.startswith(('wsgi_pgconn.tooling', "
        "'wsgi_pgconn.bench', 'wsgi_pgconn.tempdb'))]\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr


def test_short_commands_and_names_still_work() -> None:
    assert wsgi_pgconn.tempdb.TemporaryCluster is tempdb.TemporaryCluster
    assert wsgi_pgconn.tempdb.TempClusterError is tempdb.TempClusterError
    assert wsgi_pgconn.tempdb.find_bindir is tempdb.find_bindir
    assert wsgi_pgconn.tempdb.BINDIR_ENV == tempdb.BINDIR_ENV
    proc = subprocess.run(
        [sys.executable, "-m", "wsgi_pgconn.bench", "--list"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("connect-tcp-pg2 ")
    assert proc.stderr == ""  # no runpy warning about a module found twice
