"""Shared fixtures for the interop tests: a real `tether serve` subprocess.

The binary is $TETHER_BIN when set (scripts/test.sh sets it after `cargo build`),
else target/debug/tether, which is built first with `cargo build` so a direct
`pytest tests/python` never runs a stale binary.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]

# How long the server may take to start listening.
START_TIMEOUT_S = 20.0
# How long the registry may take to drop a closed connection (stats poll).
SETTLE_TIMEOUT_S = 5.0


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tether_bin() -> Path:
    explicit = os.environ.get("TETHER_BIN")
    if explicit:
        path = Path(explicit)
    else:
        subprocess.run(["cargo", "build", "--quiet", "-p", "tether"], cwd=ROOT, check=True)
        path = ROOT / "target" / "debug" / "tether"
    if not os.access(path, os.X_OK):
        pytest.fail(f"tether binary not found or not executable: {path}")
    return path


@dataclass
class Server:
    """A running `tether serve`."""

    proc: subprocess.Popen
    client_addr: str  # host:port of the client listener
    api_addr: str  # host:port of the API listener
    node_id: str
    env: dict[str, str]
    log_path: Path
    http: requests.Session = field(default_factory=requests.Session)

    @property
    def ws_base(self) -> str:
        return f"ws://{self.client_addr}"

    @property
    def api_base(self) -> str:
        return f"http://{self.api_addr}"

    @property
    def client_base(self) -> str:
        return f"http://{self.client_addr}"

    def ws_url(self, query: str = "") -> str:
        return f"{self.ws_base}/ws" + (f"?{query}" if query else "")

    def api_get(self, path: str, **kw) -> requests.Response:
        return self.http.get(self.api_base + path, timeout=5, **kw)

    def api_post_json(self, path: str, body) -> requests.Response:
        # requests' json= sets Content-Type: application/json.
        return self.http.post(self.api_base + path, json=body, timeout=5)

    def stats(self) -> dict:
        try:
            r = self.api_get("/api/stats")
        except requests.RequestException as e:
            raise AssertionError(f"GET /api/stats failed ({e}); {self.status()}") from None
        assert r.status_code == 200, r.text
        return r.json()

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def status(self) -> str:
        """Whether the process still runs, and how it ended if not."""
        code = self.proc.poll()
        if code is None:
            return f"tether (pid {self.proc.pid}) is running"
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
        return f"tether (pid {self.proc.pid}) {how}; log tail:\n{self.log_tail()}"

    def assert_alive(self) -> None:
        assert self.proc.poll() is None, self.status()


def idle_stats_problem(stats: dict) -> str | None:
    """None when the server holds nothing; else what it still holds."""
    conns = stats.get("connections") or {}
    held = {
        "connections.ws": conns.get("ws"),
        "connections.sse": conns.get("sse"),
        "connections.proxy": conns.get("proxy"),
        "clients": stats.get("clients"),
        "tasks": stats.get("tasks"),
        "pending_handshakes": stats.get("pending_handshakes"),
    }
    bad = {k: v for k, v in held.items() if v != 0}
    return None if not bad else f"not idle: {bad} (full stats: {stats})"


def wait_idle(server: Server, timeout_s: float = SETTLE_TIMEOUT_S) -> dict:
    """Polls /api/stats until the server holds no connection, client or task."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = server.stats()
        problem = idle_stats_problem(stats)
        if problem is None:
            return stats
        if time.monotonic() >= deadline:
            raise AssertionError(f"after {timeout_s}s the server is {problem}\nlog tail:\n{server.log_tail()}")
        time.sleep(0.05)


def _clean_env(overrides: dict[str, str]) -> dict[str, str]:
    # Drop TETHER_* settings inherited from the caller's shell so that only the
    # test's own configuration applies.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_") and k != "RUST_LOG"}
    env.update(overrides)
    return env


def start_server(bin_path: Path, overrides: dict[str, str], log_dir: Path, node_id: str = "pynode") -> Server:
    """Starts `tether serve` on free loopback ports and waits until both listeners answer."""
    last_error = ""
    for attempt in range(3):  # a port picked by free_port() may be taken meanwhile
        client_port, api_port = free_port(), free_port()
        if client_port == api_port:
            continue
        client_addr, api_addr = f"127.0.0.1:{client_port}", f"127.0.0.1:{api_port}"
        log_path = log_dir / f"tether-{node_id}-{attempt}.log"
        env = _clean_env(overrides)
        log = open(log_path, "wb")
        proc = subprocess.Popen(
            [str(bin_path), "serve", "--listen", client_addr, "--api-listen", api_addr, "--node-id", node_id],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        server = Server(proc, client_addr, api_addr, node_id, env, log_path)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                a = requests.get(server.api_base + "/healthz", timeout=1)
                c = requests.get(server.client_base + "/healthz", timeout=1)
                if a.status_code == 200 and c.status_code == 200:
                    return server
            except requests.RequestException:
                pass
            time.sleep(0.05)
        last_error = f"attempt {attempt}: exit code {proc.poll()}; log tail:\n{server.log_tail()}"
        stop_server(server)
    raise RuntimeError(f"tether did not start listening: {last_error}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout=5)
    server.http.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Adds the server's log tail to the report of a failing test that used one."""
    report = yield
    if report.failed:
        server = getattr(item, "funcargs", {}).get("server")
        if isinstance(server, Server):
            report.sections.append(("tether log tail", server.log_tail()))
    return report
