"""Overload benchmark, open-loop: a real service driven at about 0.5x and 2.5x its measured
capacity, to show that it sheds (503 with Retry-After, counted in `/metrics`) and that the
requests it accepts keep a bounded p99 instead of one that grows with the run.

Open loop: requests leave on a fixed schedule (`rate` per second), whether or not earlier
ones were answered, and each latency is measured from the request's scheduled start (as
wrk2 does), so a stalled server cannot slow the clients down and hide its queue (the
coordinated omission of a closed loop of N connections). wrk here is closed-loop and wrk2
is not packaged, so the generator is written by hand on asyncio streams: a minimal HTTP/1.1
client (one request per connection at a time, idle keep-alive connections reused, new ones
opened when none is idle). httpx costs several times more CPU per request, and on a 2-core
host that capped the generator below the service's capacity.

Capacity is measured first, closed-loop (`--connections` connections back to back for
`--seconds`): the 200s per second. Each load is bounded in time and in requests.

Run: .venv/bin/python bench/overload.py [--seconds 8] [--rows 20] [--max-latency-ms 250]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.results import write_section  # noqa: E402

SECTION = "## Overload, open-loop (bench/overload.py)"
BENCH_TOKEN = "overload-bench-token"
START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Outcome:
    """One request: its status (0: no answer), latency from its scheduled start, its
    Retry-After header, the transport error if any, and how late the generator itself began
    it (`lag_s`: part of the latency that is the 2-core host's, not the service's)."""

    status: int
    latency_s: float
    retry_after: str | None = None
    error: str | None = None
    lag_s: float = 0.0


def http_request(host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    """The bytes of one HTTP/1.1 POST."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Connections:
    """Idle keep-alive connections to one server, reused; a new one when none is idle."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened = 0

    async def exchange(self, request: bytes) -> tuple[int, dict[str, str]]:
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            self.opened += 1
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            status = int(status_line.split(" ", 2)[1])
            headers = {}
            for line in header_lines:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            await reader.readexactly(int(headers.get("content-length", "0")))
        except BaseException:
            writer.close()
            raise
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self.idle.append((reader, writer))
        return status, headers

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


async def open_loop(
    host: str,
    port: int,
    request: bytes,
    *,
    rate: float,
    seconds: float,
    max_requests: int,
    timeout_s: float = 30.0,
) -> list[Outcome]:
    """`rate` requests per second for `seconds` (at most `max_requests`), each sent at its
    scheduled time whatever happened to the others; latency from the scheduled time."""
    if rate <= 0 or seconds <= 0 or max_requests < 1:
        raise ValueError(f"rate {rate}, seconds {seconds}, max_requests {max_requests}")
    loop = asyncio.get_running_loop()
    pool = _Connections(host, port)
    n = min(max_requests, max(1, round(rate * seconds)))
    start = loop.time() + 0.05

    async def one(at: float) -> Outcome:
        lag = loop.time() - at
        try:
            status, headers = await asyncio.wait_for(pool.exchange(request), timeout_s)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as err:
            return Outcome(0, loop.time() - at, error=type(err).__name__, lag_s=lag)
        return Outcome(status, loop.time() - at, headers.get("retry-after"), lag_s=lag)

    tasks = []
    for i in range(n):
        at = start + i / rate
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(at)))
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        pool.close()


async def closed_loop_rate(
    host: str, port: int, request: bytes, *, connections: int, seconds: float
) -> float:
    """Capacity: 200s per second from `connections` back-to-back clients for `seconds`."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    ok = 0

    async def client() -> None:
        nonlocal ok
        pool = _Connections(host, port)
        try:
            while loop.time() < end:
                status, _ = await pool.exchange(request)
                ok += status == 200
        finally:
            pool.close()

    started = loop.time()
    await asyncio.gather(*(client() for _ in range(connections)))
    return ok / (loop.time() - started)


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    """Counts by outcome and the accepted (200) requests' latency percentiles, in ms."""
    accepted = np.array([o.latency_s for o in outcomes if o.status == 200]) * 1000.0
    lags = np.array([o.lag_s for o in outcomes if o.status == 200]) * 1000.0
    shed = [o for o in outcomes if o.status == 503]

    def pct(q: float, values: np.ndarray = accepted) -> float:
        return float(np.percentile(values, q)) if len(values) else float("nan")

    return {
        "sent": len(outcomes),
        "accepted": len(accepted),
        "shed": len(shed),
        "shed_with_retry_after": sum(o.retry_after is not None for o in shed),
        "other_status": sum(o.status not in (0, 200, 503) for o in outcomes),
        "no_answer": sum(o.status == 0 for o in outcomes),
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "lag_p99_ms": pct(99, lags),
        "max_ms": float(accepted.max()) if len(accepted) else float("nan"),
    }


def halves(outcomes: list[Outcome]) -> tuple[float, float]:
    """The accepted p99 (ms) of the first and the second half of the schedule: equal when
    latency is bounded, growing when the queue is."""
    mid = len(outcomes) // 2
    return summarize(outcomes[:mid])["p99_ms"], summarize(outcomes[mid:])["p99_ms"]


def metric_sum(url: str, sample: str, **labels: str) -> float:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    text = httpx.get(f"{url}/metrics", timeout=10.0).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


# --- the bench ----------------------------------------------------------------------------------


def prepare(
    work: Path, max_latency_ms: int, max_in_flight: int
) -> tuple[Path, str, list[dict[str, Any]]]:
    """A logistic regression registered as @champion in a SQLite registry under `work`; the
    config (with `serving.max_latency_ms` and `serving.max_in_flight`) and holdout rows."""
    from mlflow import MlflowClient

    from flows.registry import register_onnx_model
    from models.config import TrainConfig, load_config
    from models.data import load_dataset, split_data
    from models.onnx_export import export_onnx
    from models.registry_layout import CHAMPION_ALIAS
    from models.train import train_model
    from services.auth import hash_api_key

    raw = yaml.safe_load((REPO / "mlgate.yaml").read_text())
    raw["dataset"]["path"] = str(REPO / "data" / "churn.parquet")
    raw["registry"]["store_dir"] = str(work / "store")
    raw["serving"].update(
        {
            "api_keys": [{"name": "bench", "sha256": hash_api_key(BENCH_TOKEN)}],
            "rate_limit_per_s": 1e9,
            "rate_limit_burst": 1_000_000_000,
            "inference_log_dir": str(work / "inference_log"),
            "max_latency_ms": max_latency_ms,
            "max_in_flight": max_in_flight,
        }
    )
    config_path = work / "mlgate.yaml"
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(config_path)
    train_cfg = TrainConfig(estimator="logistic_regression")
    split = split_data(load_dataset(cfg.dataset), cfg.dataset, train_cfg)
    trained = train_model(split.train, cfg.dataset, train_cfg)
    uri = cfg.registry.resolved_tracking_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    # Registered as the project registers any ONNX model (flows/registry.py).
    mv = register_onnx_model(
        client,
        cfg.registry,
        cfg.dataset,
        export_onnx(trained.pipeline, cfg.dataset),
        run_name="overload bench",
        tags={},
    )
    name = cfg.registry.model_name
    client.set_registered_model_alias(name, CHAMPION_ALIAS, mv.version)
    rows = json.loads(
        split.holdout[list(cfg.dataset.features)].iloc[:1000].to_json(orient="records")
    )
    return config_path, name, rows


@contextlib.contextmanager
def serving(config_path: Path, model_name: str, home: Path) -> Iterator[Any]:
    from models.model_ref import ModelRef
    from services.launcher import start_service

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    with start_service(
        config_path,
        ModelRef(model_name, alias="champion"),
        port=port,
        env={"BENTOML_HOME": str(home)},
    ) as proc:
        proc.wait_ready(timeout=START_TIMEOUT_S)
        yield proc


def predict_request(proc: Any, rows: list[dict[str, Any]], token: str) -> bytes:
    body = json.dumps({"rows": rows}).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    return http_request(proc.host, proc.port, "/predict", body, headers)


def run_loads(
    proc: Any,
    request: bytes,
    *,
    seconds: float,
    connections: int,
    factors: tuple[float, ...],
    max_requests: int,
) -> tuple[float, list[tuple[float, float, dict[str, Any], float, float, float]]]:
    """Capacity, then each factor's open-loop load: (factor, rate, summary, 503s counted by
    `/metrics` during it, first-half p99, second-half p99)."""
    capacity = asyncio.run(
        closed_loop_rate(proc.host, proc.port, request, connections=connections, seconds=seconds)
    )
    out = []
    for factor in factors:
        rate = factor * capacity
        before = metric_sum(proc.url, "mlgate_requests_total", status="503")
        outcomes = asyncio.run(
            open_loop(
                proc.host, proc.port, request, rate=rate, seconds=seconds, max_requests=max_requests
            )
        )
        time.sleep(1.5)  # the metrics flush every second
        counted = metric_sum(proc.url, "mlgate_requests_total", status="503") - before
        first, second = halves(outcomes)
        out.append((factor, rate, summarize(outcomes), counted, first, second))
    return capacity, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rows", type=int, default=20, help="rows per request")
    parser.add_argument("--max-latency-ms", type=int, default=250)
    parser.add_argument("--max-in-flight", type=int, default=128)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--max-requests", type=int, default=20_000)
    parser.add_argument("--no-write", action="store_true", help="print, do not write RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mlgate-overload-") as tmp:
        work = Path(tmp)
        config_path, name, rows = prepare(work, args.max_latency_ms, args.max_in_flight)
        with serving(config_path, name, work / "bentoml_home") as proc:
            request = predict_request(proc, rows[: args.rows], BENCH_TOKEN)
            capacity, loads = run_loads(
                proc,
                request,
                seconds=args.seconds,
                connections=args.connections,
                factors=(0.5, 2.5),
                max_requests=args.max_requests,
            )
    text = render(args, capacity, loads)
    print(text)
    if not args.no_write:
        write_section(SECTION, text)
    return 0


def render(
    args: argparse.Namespace,
    capacity: float,
    loads: list[tuple[float, float, dict[str, Any], float, float, float]],
) -> str:
    load_avg = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        SECTION,
        "",
        f"One worker, {args.rows}-row requests, `serving.max_latency_ms` {args.max_latency_ms} "
        f"(the batcher's deadline); capacity {capacity:.0f} requests/s measured closed-loop "
        f"({args.connections} connections, {args.seconds:g} s). Each load: open-loop, "
        f"{args.seconds:g} s, latency from each request's scheduled start. Load average "
        f"{load_avg} (a shared 2-core host: ratios, not absolutes). Generator lag: how late "
        "the generator, on the same 2 cores, began an accepted request (in its latency).",
        "",
        "| load | offered/s | sent | accepted | shed 503 | with Retry-After | 503 in /metrics "
        "| other | no answer | accepted p50 ms | accepted p99 ms | p99 1st half | p99 2nd half "
        "| generator lag p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for factor, rate, s, counted, first, second in loads:
        lines.append(
            f"| {factor:g}x | {rate:.0f} | {s['sent']} | {s['accepted']} | {s['shed']} "
            f"| {s['shed_with_retry_after']} | {counted:.0f} | {s['other_status']} "
            f"| {s['no_answer']} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {first:.1f} "
            f"| {second:.1f} | {s['lag_p99_ms']:.1f} |"
        )
    lines += [
        "",
        f"Command: `.venv/bin/python bench/overload.py --seconds {args.seconds:g} --rows "
        f"{args.rows} --max-latency-ms {args.max_latency_ms}`.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
