"""What a benchmark run measured on: Pythons, servers, tools, PostgreSQL, the machine.

The servers may run on another Python than the client (the servers' venv of
``.ci/install-servers.sh`` is built from Debian's Python 3.11, whatever
Python runs the benchmark), so each is asked for its own version.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

# Distribution names asked of the servers' Python, in the order shown.
SERVER_PACKAGES = (
    "mod_wsgi",
    "gunicorn",
    "werkzeug",
    "flask",
    "django",
    "sqlalchemy",
    "flask-sqlalchemy",
    "psycopg",
    "psycopg-pool",
)
_PSYCOPG2 = ("psycopg2", "psycopg2-binary")

_VERSIONS_SCRIPT = r"""
import json, sys
from importlib import metadata
found = {"python": sys.version.split()[0], "implementation": sys.implementation.name}
for name in sys.argv[1:]:
    for dist in name.split("|"):
        try:
            found[name.split("|")[0]] = metadata.version(dist)
            break
        except metadata.PackageNotFoundError:
            pass
print(json.dumps(found))
"""


@dataclass
class PythonInfo:
    executable: str
    version: str
    implementation: str = "cpython"
    packages: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        name = "Python" if self.implementation == "cpython" else self.implementation
        return f"{name} {self.version} ({self.executable})"


def python_info(python: str, packages: tuple[str, ...] = ()) -> PythonInfo:
    """Ask ``python`` (in a subprocess) for its version and those of ``packages``.

    A package is ``"name"`` or ``"name|other-distribution-name"``.
    """
    try:
        result = subprocess.run(
            [python, "-c", _VERSIONS_SCRIPT, *packages],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        found = json.loads(result.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return PythonInfo(python, "unknown")
    version = str(found.pop("python"))
    implementation = str(found.pop("implementation"))
    return PythonInfo(python, version, implementation, {k: str(v) for k, v in found.items()})


def client_python() -> PythonInfo:
    return PythonInfo(sys.executable, platform.python_version(), sys.implementation.name, {})


def _first_line(argv: list[str]) -> str:
    try:
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    text = (result.stdout or result.stderr).strip()
    return text.splitlines()[0] if text else ""


def apache_version() -> str | None:
    """Apache's version (``2.4.65``) as ``apache2 -v`` or ``httpd -v`` says, or None."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    for name in ("apache2", "httpd"):
        exe = shutil.which(name, path=search)
        if exe:
            match = re.search(r"Apache/(\S+)", _first_line([exe, "-v"]))
            if match:
                return match.group(1)
    return None


def wrk_version() -> str | None:
    exe = shutil.which("wrk")
    if not exe:
        return None
    match = re.search(r"wrk\s+(\S+)", _first_line([exe, "--version"]))
    return match.group(1) if match else None


def pgbouncer_version(exe: str | None) -> str | None:
    if not exe:
        return None
    match = re.search(r"PgBouncer\s+(\S+)", _first_line([exe, "--version"]))
    return match.group(1) if match else None


def cpu_counts() -> tuple[int, int]:
    """(CPUs of the machine, CPUs this process may run on)."""
    total = os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = total
    return total, usable


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


@dataclass
class Environment:
    """Collected at the start of a run; :meth:`lines` is the header, :meth:`as_dict` the JSON."""

    client: PythonInfo
    server: PythonInfo
    server_kind: str
    apache: str | None = None
    wrk: str | None = None
    pgbouncer: str | None = None
    postgresql: str = "unknown"
    database: str = ""
    cpus: tuple[int, int] = (1, 1)
    load: tuple[float, float, float] | None = None

    def server_software(self) -> list[str]:
        packages = self.server.packages
        shown = []
        for name in ("mod_wsgi", "gunicorn", "werkzeug"):
            if name in packages:
                shown.append(f"{name} {packages[name]}")
        if self.server_kind == "mod_wsgi" and self.apache:
            shown.append(f"Apache {self.apache}")
        label = {
            "flask": "Flask",
            "django": "Django",
            "sqlalchemy": "SQLAlchemy",
            "flask-sqlalchemy": "Flask-SQLAlchemy",
            "psycopg": "psycopg",
            "psycopg-pool": "psycopg_pool",
        }
        for name in (*label, "psycopg2"):
            if name in packages:
                shown.append(f"{label.get(name, name)} {packages[name]}")
        return shown

    def lines(self) -> list[str]:
        same = self.server.executable == self.client.executable
        if same:
            where = "the client's Python"
        elif self.server.version == self.client.version:
            where = f"{self.server.describe()}, another Python of the same version"
        else:
            where = f"{self.server.describe()}: NOT the client's Python"
        software = ", ".join(self.server_software()) or "versions unknown"
        total, usable = self.cpus
        cpus = f"{total} CPUs" + (f" ({usable} usable by this process)" if usable != total else "")
        load = (
            "load average " + " ".join(f"{x:.2f}" for x in self.load) + " (1, 5, 15 min)"
            if self.load is not None
            else "load average unknown"
        )
        tools = [f"wrk {self.wrk}"] if self.wrk else []
        if self.pgbouncer:
            tools.append(f"PgBouncer {self.pgbouncer}")
        return [
            f"client:   {self.client.describe()}",
            f"servers:  {where}; {software}",
            f"database: PostgreSQL {self.postgresql}; {self.database}",
            *([f"tools:    {', '.join(tools)}"] if tools else []),
            f"machine:  {cpus}; {load} at the start",
        ]

    def as_dict(self) -> dict[str, object]:
        return {
            "client_python": {
                "executable": self.client.executable,
                "version": self.client.version,
            },
            "server_python": {
                "executable": self.server.executable,
                "version": self.server.version,
                "packages": self.server.packages,
            },
            "apache": self.apache,
            "wrk": self.wrk,
            "pgbouncer": self.pgbouncer,
            "postgresql": self.postgresql,
            "database": self.database,
            "cpus": self.cpus[0],
            "cpus_usable": self.cpus[1],
            "load_average": list(self.load) if self.load is not None else None,
        }


def server_packages() -> tuple[str, ...]:
    """The names :func:`python_info` takes for the servers' Python."""
    return (*SERVER_PACKAGES, "|".join(_PSYCOPG2))
