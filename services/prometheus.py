"""Prometheus beside the service: its configuration, the server process, and queries.

`mlgate slo prometheus` runs Debian's Prometheus (the `prometheus` package, which the
Makefile installs for promtool) on loopback with the rules `mlgate slo rules` generates,
scraping the instances that serve the model: the service on `serving.port`, and, while a
canary runs, its stable and canary instances (read from the canary's state when Prometheus
starts; HAProxy's public port is not scraped, the instances are). The scrape reaches them
from this host without a proxy, which `serving.internal_endpoints: local` (the default)
lets read `/metrics` without a key; with `key`, give a token file (`credentials_file`).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import tenacity
import yaml

from services import breakers
from services.processes import die_with_parent_preexec

QUERY_ATTEMPTS = 3


class PrometheusError(RuntimeError):
    """Prometheus is missing, refused its configuration, or did not become ready."""


def find_prometheus() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if found is None:
        raise PrometheusError("prometheus is not installed (Debian: apt install prometheus)")
    return found


def render_prometheus_config(
    targets: Mapping[str, str],
    rule_files: list[Path],
    *,
    scrape_interval_s: float = 15.0,
    credentials_file: Path | None = None,
) -> str:
    """prometheus.yml: one job, `mlgate`, with a static target per instance
    (`{variant: "host:port"}`, labelled with the variant), and the rule files."""
    job: dict[str, Any] = {
        "job_name": "mlgate",
        "metrics_path": "/metrics",
        "static_configs": [
            {"targets": [address], "labels": {"mlgate_instance": name}}
            for name, address in sorted(targets.items())
        ],
    }
    if credentials_file is not None:
        job["authorization"] = {"type": "Bearer", "credentials_file": str(credentials_file)}
    interval = f"{max(1, round(scrape_interval_s))}s"
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [job],
    }
    return yaml.safe_dump(config, sort_keys=False)


class PrometheusProcess:
    """A running Prometheus on 127.0.0.1:`port`, storing under `data_dir`."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PrometheusError(
                    f"prometheus exited ({self.process.returncode}): {self._tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/-/ready", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.2)
        raise PrometheusError(f"prometheus was not ready after {timeout:.0f} s: {self._tail()}")

    def query(self, expr: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        """An instant query's result vector; PrometheusError naming the expression when
        Prometheus refuses it. A connection that fails or times out is tried again
        (`QUERY_ATTEMPTS`, exponential backoff with full jitter: a query is a read), the
        whole as one call of the `prometheus` circuit breaker; while that is open,
        PrometheusError saying so at once."""
        url = f"{self.url}/api/v1/query"

        def get() -> httpx.Response:
            for attempt in tenacity.Retrying(
                retry=tenacity.retry_if_exception_type(httpx.TransportError),
                wait=tenacity.wait_random_exponential(multiplier=0.2, max=2.0),
                stop=tenacity.stop_after_attempt(QUERY_ATTEMPTS),
                reraise=True,
            ):
                with attempt:
                    return httpx.get(url, params={"query": expr}, timeout=timeout)
            raise AssertionError("unreachable: tenacity reraises")

        try:
            response = breakers.call(
                "prometheus",
                get,
                is_failure=lambda err: isinstance(err, httpx.TransportError),
                target=self.url,
            )
        except breakers.CircuitOpenError as err:
            raise PrometheusError(str(err)) from None
        except httpx.TransportError as err:
            raise PrometheusError(
                f"prometheus at {self.url} did not answer ({type(err).__name__}: {err}): {expr}"
            ) from None
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise PrometheusError(f"query refused: {body.get('error', response.text)}: {expr}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)

    def __enter__(self) -> PrometheusProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-2000:]
        return ""


def start_prometheus(
    config_path: Path, data_dir: Path, port: int, *, die_with_parent: bool = True
) -> PrometheusProcess:
    """Start Prometheus on loopback with `config_path` (it refuses a bad file or rule and
    exits: `wait_ready` then says why). Returns at once; call `wait_ready()`."""
    binary = find_prometheus()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "prometheus.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={data_dir}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-lifecycle",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent_preexec() if die_with_parent else None,
        )
    return PrometheusProcess(process, port, log_path)
