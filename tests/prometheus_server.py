"""A real Prometheus server for tests (Debian's ``prometheus`` package), on 127.0.0.1.

    with PrometheusServer(targets=["127.0.0.1:9464"], job="my-service") as prom:
        prom.wait_for_target_up()
        prom.query('sum(otel_budget_cost_USD_total)')          # -> [{"metric": {...}, "value": [t, "1.5"]}]

It starts ``prometheus`` on a free loopback port with a temporary config and data directory,
scraping the given targets every second, and stops it by its PID (SIGTERM, then SIGKILL). No
other process is touched. ``binary()`` is None when Prometheus is not installed, so a test can
skip with a reason (``apt-get install -y prometheus`` provides it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

_CANDIDATES = ("/usr/bin/prometheus", "/usr/local/bin/prometheus")


def binary() -> str | None:
    """The Prometheus binary: ``$PROMETHEUS_BIN``, the PATH, or Debian's location."""
    explicit = os.environ.get("PROMETHEUS_BIN")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    found = shutil.which("prometheus")
    if found:
        return found
    for path in _CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return None


def version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False)
    first = (out.stdout or out.stderr).splitlines()
    return first[0] if first else "unknown"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrometheusError(RuntimeError):
    pass


class PrometheusServer:
    def __init__(
        self,
        targets: Sequence[str],
        *,
        job: str = "otel_budget_test",
        scrape_interval: str = "1s",
        path: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.targets = list(targets)
        self.job = job
        self.scrape_interval = scrape_interval
        self.path = path or binary()
        self.extra_args = list(extra_args)
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None
        self._log: Any = None

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        if self.path is None:
            raise PrometheusError("prometheus is not installed (apt-get install -y prometheus)")
        self._dir = tempfile.mkdtemp(prefix="otel-budget-prometheus-")
        config = os.path.join(self._dir, "prometheus.yml")
        with open(config, "w", encoding="utf-8") as fh:
            # JSON is YAML: no YAML library needed to write the config.
            json.dump({
                "global": {"scrape_interval": self.scrape_interval,
                           "evaluation_interval": self.scrape_interval},
                "scrape_configs": [{
                    "job_name": self.job,
                    "scrape_interval": self.scrape_interval,
                    "scrape_timeout": self.scrape_interval,
                    "static_configs": [{"targets": self.targets}],
                }],
            }, fh)  # fmt: skip
        self.port = free_port()
        self._log = open(os.path.join(self._dir, "prometheus.log"), "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                self.path,
                f"--config.file={config}",
                f"--storage.tsdb.path={os.path.join(self._dir, 'data')}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
                *self.extra_args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self.process.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise PrometheusError(f"prometheus was not ready within {timeout} s")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)  # by PID: only the server this helper started
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        if self._dir is None:
            return ""
        try:
            with open(os.path.join(self._dir, "prometheus.log"), encoding="utf-8", errors="replace") as fh:
                return fh.read()[-4000:]
        except OSError:
            return ""

    # -- HTTP API ---------------------------------------------------------------------------
    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(
            [(k, v) for k, vs in params.items() for v in (vs if isinstance(vs, list) else [vs])]
        )
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            body = json.load(exc)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query; ``at`` is a Unix time in seconds (default: now)."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def label_values(self, label: str, match: str | None = None) -> list[str]:
        params: dict[str, Any] = {}
        if match is not None:
            params["match[]"] = match
        return list(self.api(f"label/{label}/values", **params))

    def exemplars(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        return list(self.api("query_exemplars", query=expr, start=f"{start:.3f}", end=f"{end:.3f}"))

    def targets_up(self) -> list[dict[str, Any]]:
        return [t for t in self.api("targets")["activeTargets"] if t.get("health") == "up"]

    def wait_for(self, check: Callable[[], Any], timeout: float = 15.0, interval: float = 0.2) -> Any:
        """Call ``check`` until it returns something truthy; its last error explains a timeout."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                result = check()
                if result:
                    return result
                last = result
            except (PrometheusError, AssertionError, KeyError, IndexError, ValueError) as exc:
                last = exc
            time.sleep(interval)
        raise PrometheusError(f"timed out after {timeout} s; last result: {last!r}\n{self.log()}")

    def wait_for_target_up(self, timeout: float = 15.0) -> None:
        self.wait_for(lambda: len(self.targets_up()) == len(self.targets), timeout)
