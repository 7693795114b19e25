"""Load generators: ``wrk`` when installed, else a Python one in its own process.

Both return a :class:`LoadResult`.  The Python generator runs as
``python -m wsgi_pgconn.tooling.bench.load URL --connections N --duration S`` and
prints one JSON object; it keeps N HTTP/1.1 keep-alive connections busy
(reconnecting when the server closes, as gunicorn's sync workers do).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

WRK_INSTALL = "apt-get install wrk"

# wrk reports through this script's done() hook, as one JSON line.
WRK_SCRIPT = r"""
done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
                 + summary.errors.timeout
  io.write(string.format(
    "WRKJSON {\"requests\": %d, \"duration_us\": %d, \"errors\": %d, \"non2xx\": %d, " ..
    "\"p50_us\": %d, \"p99_us\": %d}\n",
    summary.requests, summary.duration, errors, summary.errors.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class LoadResult:
    requests: int
    duration: float
    errors: int
    non2xx: int
    p50_ms: float
    p99_ms: float
    tool: str

    @property
    def rps(self) -> float:
        """Successful (2xx) responses per second."""
        good = self.requests - self.non2xx
        return good / self.duration if self.duration else 0.0


def wrk_path() -> str | None:
    return shutil.which("wrk")


def run_wrk(url: str, connections: int, duration: float, threads: int | None = None) -> LoadResult:
    wrk = wrk_path()
    if wrk is None:
        raise RuntimeError(f"wrk not found: {WRK_INSTALL}")
    threads = threads or max(1, min(2, connections))
    with tempfile.NamedTemporaryFile(
        "w", suffix=".lua", prefix="wsgi-pgconn-wrk-", delete=False
    ) as f:
        f.write(WRK_SCRIPT)
        script = f.name
    try:
        result = subprocess.run(
            [
                wrk,
                f"-t{threads}",
                f"-c{connections}",
                f"-d{max(1, round(duration))}s",
                "--timeout",
                "10s",
                "-s",
                script,
                url,
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=duration + 60,
            check=False,
        )
    finally:
        os.unlink(script)
    for line in result.stdout.splitlines():
        if line.startswith("WRKJSON "):
            data = json.loads(line[len("WRKJSON ") :])
            return LoadResult(
                requests=data["requests"],
                duration=data["duration_us"] / 1e6,
                errors=data["errors"],
                non2xx=data["non2xx"],
                p50_ms=data["p50_us"] / 1000.0,
                p99_ms=data["p99_us"] / 1000.0,
                tool="wrk",
            )
    stderr = result.stderr.strip()[-500:]
    raise RuntimeError(f"wrk printed no result (exit {result.returncode}): {stderr}")


def run_python_load(url: str, connections: int, duration: float) -> LoadResult:
    """Run the Python generator in a separate process (so it does not share our GIL)."""
    import wsgi_pgconn

    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(wsgi_pgconn.__file__)))
    pythonpath = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "wsgi_pgconn.tooling.bench.load",
            url,
            "--connections",
            str(connections),
            "--duration",
            str(duration),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=duration + 60,
        env=dict(os.environ, PYTHONPATH=pythonpath),
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"load generator failed: {result.stderr.strip()[-1000:]}")
    data = json.loads(result.stdout.strip().splitlines()[-1])
    return LoadResult(tool="python", **data)


def run_load(url: str, connections: int, duration: float, tool: str = "auto") -> LoadResult:
    """``tool``: ``wrk``, ``python`` or ``auto`` (wrk when installed)."""
    if tool == "wrk" or (tool == "auto" and wrk_path()):
        return run_wrk(url, connections, duration)
    return run_python_load(url, connections, duration)


# --- the Python load generator -------------------------------------------------


class _Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0
        self.non2xx = 0


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; returns (status, keep_alive)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, status = lines[0].split(" ", 2)[:2]
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    else:
        await reader.read()
        return int(status), False
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" and (version == "HTTP/1.1" or connection == "keep-alive")
    return int(status), keep_alive


async def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _client(host: str, port: int, request: bytes, deadline: float, stats: _Stats) -> None:
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        while time.monotonic() < deadline:
            try:
                if reader is None or writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                start = time.perf_counter()
                writer.write(request)
                status, keep_alive = await _read_response(reader)
                stats.latencies.append(time.perf_counter() - start)
                if not 200 <= status < 300:
                    stats.non2xx += 1
                if not keep_alive:
                    await _close(writer)
                    reader = writer = None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                stats.errors += 1
                await _close(writer)
                reader = writer = None
                await asyncio.sleep(0.01)  # back off after a refused or reset connection
    finally:
        await _close(writer)


def _percentile(sorted_values: Sequence[float], pct: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(pct / 100.0 * len(sorted_values)) - 1))
    return sorted_values[index]


async def generate(url: str, connections: int, duration: float) -> dict[str, Any]:
    """Keep ``connections`` clients busy for ``duration`` seconds; return the counts."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: wsgi-pgconn-bench\r\n\r\n"
    ).encode()
    stats = _Stats()
    start = time.monotonic()
    deadline = start + duration
    await asyncio.gather(
        *(_client(host, port, request, deadline, stats) for _ in range(connections))
    )
    elapsed = time.monotonic() - start
    lat = sorted(stats.latencies)
    return {
        "requests": len(lat),
        "duration": elapsed,
        "errors": stats.errors,
        "non2xx": stats.non2xx,
        "p50_ms": _percentile(lat, 50) * 1000.0,
        "p99_ms": _percentile(lat, 99) * 1000.0,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m wsgi_pgconn.tooling.bench.load",
        description="HTTP load generator of the benchmark (used when wrk is not installed).",
    )
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(generate(args.url, args.connections, args.duration))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
