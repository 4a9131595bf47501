"""Serving benchmark: the same trained churn model behind six servers, in one run.

1. ours: `bentoml serve services.bento_service:MlgateService` (ONNX Runtime, our /predict,
   adaptive batching, API key checked, inference log written), one worker;
2. `mlflow models serve` of the scikit-learn pipeline (local env, one worker);
3. a stock BentoML service, default settings, whose `@bentoml.api` calls the pipeline;
4. the floor: a bare Starlette app on uvicorn that parses the same JSON and returns a
   constant (no model, no framework), one worker;
5. the BentoML peer written as BentoML's docs show (ONNX Runtime, batchable API);
6. MLServer 1.7.1 with adaptive batching and an ONNX Runtime custom runtime, installed into
   its own venv under bench/.peers/ on first use (skipped, with a line saying why, when it
   cannot be installed).

Ours is also driven with the same rows as columnar JSON and as an Arrow IPC stream.

The other servers are the files under bench/apps/ and wrk's script is bench/wrk_post.lua.

wrk (Debian package) drives single-row requests at 1, 32 and 64 connections and 1,000-row
requests at 4 connections against each. Ours, BentoML's path alone (a fifth server, below)
and the floor run at once, and the 32-connection goal loads alternate between them in
rounds, so that their ratios share the host's conditions. Every load is bounded in time
(`--seconds`) and in requests (`--max-requests`, counted by a wrk script that stops its
thread). The script also measures in-process ONNX Runtime rows/s on 1,000-row batches (the
compute limit), and with `--profile` (needs py-spy) where our worker spends its time at 32
connections.

Run: .venv/bin/python bench/serving.py [--seconds 8] [--profile]
     .venv/bin/python bench/serving.py --tail-ab   (only the single-row tail's A/B: wrk
     sharing the CPUs with ours and the floor against wrk on a CPU of its own; prints)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.results import RESULTS, write_section  # noqa: E402
from models.config import CONFIG_PATH_ENV, env_override_name, load_config  # noqa: E402
from models.data import load_dataset, split_data  # noqa: E402
from models.model_ref import ModelRef  # noqa: E402
from models.onnx_export import (  # noqa: E402
    export_onnx,
    input_schema,
    make_session,
    onnx_inputs_from_rows,
    score_onnx,
    sha256_file,
    write_model_dir,
)
from models.registry_layout import CHAMPION_ALIAS, MODEL_ARTIFACT_DIR, SHA_TAG  # noqa: E402
from models.train import train_model  # noqa: E402
from services.auth import API_KEYS_ENV, hash_api_key  # noqa: E402
from services.schema import ARROW_STREAM, COLUMNS_JSON  # noqa: E402

BENCH = REPO / "bench"
WRK_SCRIPT = BENCH / "wrk_post.lua"
# The servers other than ours, as `module:object` under bench/apps/.
FLOOR_APP = "bench.apps.floor_app:app"
BENTO_CONSTANT = "bench.apps.bento_constant:BentoConstant"
STOCK_SERVICE = "bench.apps.stock_service:StockService"
BENTO_ONNX = "bench.apps.bento_batchable:BentoOnnx"
MLSERVER_RUNTIME = BENCH / "apps" / "mlserver_onnx.py"
# MLServer's own venv (its pins conflict with the project's lock), made once and reused.
PEERS = BENCH / ".peers"
# uvloop 0.22 made `get_event_loop()` raise outside a running loop, which kills MLServer
# 1.7.1's inference workers at start (`_ignore_signals`, SeldonIO/MLServer#2286): 0.21.
MLSERVER_PINS = ("mlserver==1.7.1", "onnxruntime==1.31.0", "uvloop==0.21.0")
MLSERVER_MODEL = "churn"
MODEL_OVERRIDE_ENV = env_override_name("serving", "model")
SECTION = "## Serving"
# The name suffix of the goal-round loads run with wrk on a CPU of its own.
OWN_CPU = ", wrk on its own CPU"
COMMAND = ".venv/bin/python bench/serving.py --profile"
PY = sys.executable
BENCH_TOKEN = "bench-token"
SINGLE_CONNECTIONS = (1, 32, 64)
BIG_ROWS, BIG_CONNECTIONS = 1000, 4
START_TIMEOUT_S = 240.0
ROUNDS = 3


@dataclass
class LoadResult:
    server: str
    load: str
    rows_per_request: int
    connections: int
    requests: int = 0
    seconds: float = 0.0
    req_s: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    non_2xx: int = 0
    socket_errors: int = 0
    error: str | None = None

    @property
    def rows_s(self) -> float:
        return self.req_s * self.rows_per_request


@dataclass
class Server:
    name: str
    url: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body_key: str = "rows"
    # How the rows travel: "rows" (`{body_key: [row, ...]}`), "columns" (our columnar
    # JSON), "arrow" (an Arrow IPC stream) or "v2" (the V2 inference protocol, MLServer).
    body_format: str = "rows"

    @property
    def content_type(self) -> str:
        return {"columns": COLUMNS_JSON, "arrow": ARROW_STREAM}.get(
            self.body_format, "application/json"
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the model and the four servers -----------------------------------------------------------


def prepare(work: Path) -> dict[str, Any]:
    """Train the churn model from mlgate.yaml once; register its ONNX export for our service,
    save the pipeline for MLflow and for the stock BentoML service."""
    import joblib
    import mlflow.sklearn
    from mlflow import MlflowClient

    cfg_raw = yaml.safe_load((REPO / "mlgate.yaml").read_text())
    cfg_raw["dataset"]["path"] = str(REPO / "data" / "churn.parquet")
    cfg_raw["registry"]["store_dir"] = str(work / "store")
    cfg_raw["serving"].update(
        {
            "api_keys": [{"name": "bench", "sha256": hash_api_key(BENCH_TOKEN)}],
            # The limiter is measured on (every request checks its key), never reached.
            "rate_limit_per_s": 1e9,
            "rate_limit_burst": 1_000_000_000,
            "inference_log_dir": str(work / "inference_log"),
        }
    )
    config_path = work / "mlgate.yaml"
    config_path.write_text(yaml.safe_dump(cfg_raw, sort_keys=False))
    cfg = load_config(config_path)
    split = split_data(load_dataset(cfg.dataset), cfg.dataset, cfg.train)
    trained = train_model(split.train, cfg.dataset, cfg.train)
    model_dir = write_model_dir(export_onnx(trained.pipeline, cfg.dataset), cfg.dataset, work / "m")

    uri = cfg.registry.resolved_tracking_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment(
        "bench", artifact_location=cfg.registry.artifact_location()
    )
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(model_dir), MODEL_ARTIFACT_DIR)
    client.set_terminated(run.info.run_id)
    client.create_registered_model(cfg.registry.model_name)
    mv = client.create_model_version(
        cfg.registry.model_name,
        source=f"{run.info.artifact_uri}/{MODEL_ARTIFACT_DIR}",
        run_id=run.info.run_id,
        tags={SHA_TAG: sha256_file(model_dir / "model.onnx")},
    )
    client.set_registered_model_alias(cfg.registry.model_name, CHAMPION_ALIAS, mv.version)

    mlflow_dir = work / "mlflow_model"
    mlflow.sklearn.save_model(
        trained.pipeline,
        str(mlflow_dir),
        serialization_format="cloudpickle",
        pyfunc_predict_fn="predict_proba",
        # Named, not inferred: inference shells out to uv and pip for seconds.
        pip_requirements=["scikit-learn", "pandas", "cloudpickle"],
    )
    joblib.dump(trained.pipeline, work / "pipeline.joblib")

    features = list(cfg.dataset.features)
    holdout = split.holdout[features].dropna()
    rows: list[dict[str, Any]] = json.loads(holdout.iloc[:BIG_ROWS].to_json(orient="records"))
    return {
        "cfg": cfg,
        "config_path": config_path,
        "model_dir": model_dir,
        "estimator": cfg.train.estimator,
        "rows": rows,
        "holdout": holdout,
    }


@contextlib.contextmanager
def running(
    cmd: list[str], env: dict[str, str], cwd: Path, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)


def httpx_post(server: Server, body_file: Path) -> str | None:
    """None when the body file scores with a 200, else what went wrong (a peer that cannot
    read a format is skipped with that line, not measured on its errors)."""
    import httpx

    try:
        r = httpx.post(
            server.url + server.path,
            content=body_file.read_bytes(),
            headers={**server.headers, "Content-Type": server.content_type},
            timeout=30,
        )
    except httpx.HTTPError as err:
        return str(err)
    return None if r.status_code == 200 else f"{r.status_code}: {r.text[:200]}"


def mlserver_python(log: Path) -> Path | str:
    """The Python of MLServer's own venv under bench/.peers/ (made with uv on first use),
    or why it could not be made."""
    venv = PEERS / "mlserver"
    python = venv / "bin" / "python"
    # The pins it was made with: a venv made with other pins is brought up to these.
    pins = venv / "mlgate-pins.txt"
    wanted = "\n".join(MLSERVER_PINS) + "\n"
    if (venv / "bin" / "mlserver").exists() and pins.is_file() and pins.read_text() == wanted:
        return python
    uv = shutil.which("uv") or str(Path(PY).with_name("uv"))
    if not Path(uv).exists():
        return "uv not found"
    with open(log, "wb") as out:
        for cmd in (
            [] if python.exists() else [uv, "venv", "--python", "3.11", str(venv)],
            [uv, "pip", "install", "--python", str(python), *MLSERVER_PINS],
        ):
            if not cmd:
                continue
            done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=900)
            if done.returncode != 0:
                return f"`{' '.join(cmd[1:3])}` failed, see its log: {log.read_text()[-300:]}"
    pins.write_text(wanted)
    return python


def mlserver_dir(work: Path, model_dir: Path, port: int) -> Path:
    """MLServer's settings and model settings: adaptive batching on (up to 32 requests, or
    2 ms), the ONNX runtime of bench/apps/mlserver_onnx.py, metrics on their own port."""
    root = work / "mlserver"
    model = root / MLSERVER_MODEL
    model.mkdir(parents=True)
    shutil.copy(MLSERVER_RUNTIME, root / MLSERVER_RUNTIME.name)
    settings = {
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "host": "127.0.0.1",
        "debug": False,
    }
    (root / "settings.json").write_text(json.dumps(settings))
    model_settings = {
        "name": MLSERVER_MODEL,
        "implementation": "mlserver_onnx.OnnxModel",
        "max_batch_size": 32,
        "max_batch_time": 0.002,
        "parameters": {"uri": str(model_dir)},
    }
    (model / "model-settings.json").write_text(json.dumps(model_settings))
    return root


def wait_until(url: str, proc: subprocess.Popen[bytes], log: Path, probe: dict[str, Any]) -> None:
    import httpx

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            r = httpx.post(url, json=probe["json"], headers=probe["headers"], timeout=5)
            if r.status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(
        f"{url} not answering 200 after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
    )


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"BENTOML_DO_NOT_TRACK": "True", "PYTHONUNBUFFERED": "1"})
    # `mlflow models serve` execs `uvicorn` from PATH.
    env["PATH"] = f"{Path(PY).parent}{os.pathsep}{env.get('PATH', '')}"
    for key in (MODEL_OVERRIDE_ENV, API_KEYS_ENV):
        env.pop(key, None)
    return env


# --- load generation ------------------------------------------------------------------------


def parse_duration_ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        return float("nan")
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def run_wrk(
    server: Server,
    body_file: Path,
    script: Path,
    connections: int,
    seconds: float,
    max_requests: int,
    rows: int,
    load: str,
    cpus: str | None = None,
) -> LoadResult:
    """One wrk load; on the CPUs `cpus` (a taskset list) when given."""
    result = LoadResult(server.name, load, rows, connections)
    env = dict(os.environ)
    env.update(
        {
            "BENCH_BODY": str(body_file),
            "BENCH_AUTH": server.headers.get("Authorization", ""),
            "BENCH_MAX_PER_THREAD": str(max_requests),
            "BENCH_CONTENT_TYPE": server.content_type,
        }
    )
    cmd = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(script),
        f"{server.url}{server.path}",
    ]
    if "Accept" in server.headers:
        cmd[1:1] = ["-H", f"Accept: {server.headers['Accept']}"]
    if cpus is not None:
        cmd = ["taskset", "-c", cpus, *cmd]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        result.error = "wrk did not finish"
        return result
    out = done.stdout
    if done.returncode != 0:
        result.error = (done.stderr or out)[-300:]
        return result
    if m := re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out):
        result.requests = int(m.group(1))
        result.seconds = parse_duration_ms(m.group(2) + m.group(3)) / 1000.0
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        result.req_s = float(m.group(1))
    if m := re.search(r"^\s+50%\s+(\S+)", out, re.M):
        result.p50_ms = parse_duration_ms(m.group(1))
    if m := re.search(r"^\s+99%\s+(\S+)", out, re.M):
        result.p99_ms = parse_duration_ms(m.group(1))
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        result.non_2xx = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        result.socket_errors = sum(int(g) for g in m.groups())
    return result


def encode_body(server: Server, rows: list[dict[str, Any]], schema: dict[str, Any]) -> bytes:
    """The same rows in the server's body format."""
    order = [*schema["numeric"], *schema["categorical"]]
    if server.body_format == "rows":
        return json.dumps({server.body_key: rows}).encode()
    columns = {c: [r[c] for r in rows] for c in order}
    if server.body_format == "columns":
        return json.dumps({"columns": columns}).encode()
    if server.body_format == "arrow":
        import pyarrow as pa

        types = {c: pa.float64() for c in schema["numeric"]}
        table = pa.table(
            {c: pa.array(v, type=types.get(c, pa.string())) for c, v in columns.items()}
        )
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return bytes(sink.getvalue().to_pybytes())
    if server.body_format == "v2":
        numeric = set(schema["numeric"])
        inputs = [
            {
                "name": c,
                "shape": [len(rows), 1],
                "datatype": "FP32" if c in numeric else "BYTES",
                "data": v,
            }
            for c, v in columns.items()
        ]
        return json.dumps({"inputs": inputs}).encode()
    raise ValueError(f"unknown body format {server.body_format!r}")


def bodies(server: Server, rows: list[dict[str, Any]], work: Path) -> tuple[Path, Path]:
    schema = SCHEMA[0]
    one = work / f"{server.name}-1.body"
    big = work / f"{server.name}-{BIG_ROWS}.body"
    one.write_bytes(encode_body(server, rows[:1], schema))
    big.write_bytes(encode_body(server, rows[:BIG_ROWS], schema))
    return one, big


# The model's input schema, set once the model is trained (bodies need it).
SCHEMA: list[dict[str, Any]] = []


def drive(
    server: Server,
    rows: list[dict[str, Any]],
    work: Path,
    script: Path,
    seconds: float,
    max_requests: int,
    on_c32: Any = None,
    connections: tuple[int, ...] = SINGLE_CONNECTIONS,
    big_requests: bool = True,
) -> list[LoadResult]:
    one, big = bodies(server, rows, work)
    probe = httpx_post(server, one)
    if probe is not None:
        print(f"  {server.name}: the probe request failed ({probe}); skipped", flush=True)
        return [LoadResult(server.name, "probe", 1, 1, error=probe)]
    # Warm-up: connections, caches, the first batches.
    run_wrk(server, one, script, 8, 1.0, max_requests, 1, "warm-up")
    results = []
    for c in connections:
        if c == 32 and on_c32 is not None:
            on_c32(server)
        r = run_wrk(server, one, script, c, seconds, max_requests, 1, f"1 row, {c} conn")
        results.append(r)
        print(
            f"  {server.name:>16} {r.load:<22} {r.req_s:>9,.0f} req/s  p50 {r.p50_ms:7.2f} ms  "
            f"p99 {r.p99_ms:7.2f} ms  non-2xx {r.non_2xx}  {r.error or ''}",
            flush=True,
        )
    if not big_requests:
        return results
    r = run_wrk(
        server,
        big,
        script,
        BIG_CONNECTIONS,
        seconds,
        max_requests,
        BIG_ROWS,
        f"{BIG_ROWS} rows, {BIG_CONNECTIONS} conn",
    )
    results.append(r)
    print(
        f"  {server.name:>14} {r.load:<22} {r.req_s:>9,.1f} req/s  {r.rows_s:>10,.0f} rows/s  "
        f"p50 {r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms  non-2xx {r.non_2xx}  {r.error or ''}",
        flush=True,
    )
    return results


# --- in-process compute limit and profile -------------------------------------------------


def in_process_rows_per_s(
    model_dir: Path, schema: dict[str, Any], rows: list[dict[str, Any]]
) -> dict[str, float]:
    session = make_session((model_dir / "model.onnx").read_bytes(), prefer_gpu=False)
    order = [*schema["numeric"], *schema["categorical"]]
    tuples = [tuple(r[c] for c in order) for r in rows[:BIG_ROWS]]
    feeds = onnx_inputs_from_rows(tuples, schema)

    def best(fn: Any, seconds: float = 2.0) -> float:
        fn()
        times = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return len(tuples) / float(np.median(times))

    return {
        "onnx_runtime": best(lambda: score_onnx(session, feeds)),
        "encode_and_onnx_runtime": best(
            lambda: score_onnx(session, onnx_inputs_from_rows(tuples, schema))
        ),
    }


# (function, file) of the frames that mark each part; first match wins, because the socket
# writes happen inside our handler's `send`.
PROFILE_BUCKETS = (
    ("socket writes (uvicorn send)", ("RequestResponseCycle.send", "httptools_impl.py")),
    ("scoring: batcher, encoder, ONNX Runtime", ("AdaptiveBatcher._drain", "services/batcher.py")),
    (
        "our handler: decode, auth, response, metrics, log queue",
        ("handle_predict", "services/app.py"),
    ),
)
FRAMEWORK = "framework: uvicorn, BentoML middlewares, Starlette routing, event loop"


def profile_worker(pid: int, seconds: float, out: Path) -> dict[str, float] | str:
    spy = shutil.which("py-spy") or str(Path(PY).with_name("py-spy"))
    if not Path(spy).exists():
        return "py-spy not installed"
    done = subprocess.run(
        [
            spy,
            "record",
            "-p",
            str(pid),
            "-d",
            str(max(1, round(seconds))),
            "-r",
            "250",
            "--format",
            "raw",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    if done.returncode != 0 or not out.exists():
        return f"py-spy failed: {(done.stderr or done.stdout)[-200:]}"
    return summarize_profile(out)


def summarize_profile(path: Path) -> dict[str, float]:
    """Shares of the event loop thread's samples: ours, scoring, socket writes, and the
    rest (uvicorn, BentoML's middlewares and routing, Starlette, the event loop itself)."""
    loop_samples = 0
    buckets: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or "uvicorn/server.py" not in stack:
            continue
        n = int(count)
        loop_samples += n
        frames = stack.split(";")
        for label, (function, file) in PROFILE_BUCKETS:
            if any(f.split(" (")[0].endswith(function) and file in f for f in frames):
                buckets[label] += n
                break
        else:
            buckets[FRAMEWORK] += n
    return {k: 100.0 * v / loop_samples for k, v in buckets.items()} if loop_samples else {}


def worker_pid(parent: int) -> int | None:
    try:
        out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return None
    pids = [int(p) for p in out.split()]
    return pids[0] if pids else None


def foreign_load() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/loadavg").read_text().split()[0]
    return "?"


# --- report ------------------------------------------------------------------------------


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def table(results: list[LoadResult]) -> list[str]:
    lines = [
        "| server | load | req/s | rows/s | p50 ms | p99 ms | non-2xx | socket errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        errors = f"{r.socket_errors} ({r.error})" if r.error else str(r.socket_errors)
        lines.append(
            f"| {r.server} | {r.load} | {r.req_s:,.1f} | {r.rows_s:,.0f} | {r.p50_ms:.2f} | "
            f"{r.p99_ms:.2f} | {r.non_2xx} | {errors} |"
        )
    return lines


def paired(rounds: list[LoadResult], server: str) -> list[LoadResult]:
    return [r for r in rounds if r.server == server]


def per_round(rounds: list[LoadResult], a: str, b: str) -> list[float]:
    """req/s of `a` over `b`, round by round."""
    return [
        ratio(x.req_s, y.req_s) for x, y in zip(paired(rounds, a), paired(rounds, b), strict=False)
    ]


def goals(
    results: list[LoadResult], rounds: list[LoadResult], compute: dict[str, float]
) -> list[tuple[str, bool, str]]:
    """The issue's goals. The 32-connection ones are judged on the alternating rounds: the
    median of the per-round ratios (ours against the other server of the same round), and
    the median round of ours for its tail."""

    def get(server: str, load: str) -> LoadResult | None:
        return next((r for r in results if r.server == server and r.load == load), None)

    def versus(goal: str, other: str, bound: float) -> tuple[str, bool, str]:
        ratios = per_round(rounds, "ours", other)
        if not ratios:
            return goal, False, f"not measured: {other} did not run"
        r = float(np.median(ratios))
        listed = ", ".join(f"{x:.1f}x" for x in ratios)
        return goal, r >= bound, f"{r:.1f}x (median of rounds: {listed})"

    ours_r = paired(rounds, "ours")
    ours_req_s = float(np.median([r.req_s for r in ours_r]))
    out = []
    floor_ratios = per_round(rounds, "ours", "floor")
    r = float(np.median(floor_ratios))
    out.append(
        (
            "single-row req/s at 32 connections >= 50% of the floor",
            r >= 0.5,
            f"{r:.0%} (median of rounds: " + ", ".join(f"{x:.0%}" for x in floor_ratios) + ")",
        )
    )
    non_2xx = sum(x.non_2xx + x.socket_errors for x in ours_r)
    out.append(("zero non-2xx at 32 connections", non_2xx == 0, f"{non_2xx} in {ROUNDS} rounds"))

    def tail(server: str) -> tuple[float, str]:
        runs = paired(rounds, server)
        mid = sorted(runs, key=lambda r: r.req_s)[len(runs) // 2]
        tails = ", ".join(f"{ratio(x.p99_ms, x.p50_ms):.1f}x" for x in runs)
        t = ratio(mid.p99_ms, mid.p50_ms)
        return (
            t,
            f"{t:.1f}x in the median round ({mid.p99_ms:.1f} vs {mid.p50_ms:.1f} ms); "
            f"rounds: {tails}",
        )

    t, text = tail("ours")
    if paired(rounds, "floor"):
        text += "; the floor: " + tail("floor")[1]
    out.append(("p99 within 3x p50 at 32 connections", t <= 3.0, text))
    if paired(rounds, f"ours{OWN_CPU}"):
        t, text = tail(f"ours{OWN_CPU}")
        if paired(rounds, f"floor{OWN_CPU}"):
            text += "; the floor: " + tail(f"floor{OWN_CPU}")[1]
        out.append(("p99 within 3x p50 at 32 connections, wrk on a CPU of its own", t <= 3.0, text))
    out.append(
        versus(
            "at least 3x BentoML with ONNX Runtime, batchable API (1 row, 32 conn)",
            "BentoML batchable",
            3.0,
        )
    )
    out.append(versus("at least 2x MLServer, adaptive batching (1 row, 32 conn)", "MLServer", 2.0))
    mlflow32, stock32 = (
        get("mlflow serve", "1 row, 32 conn"),
        get("stock BentoML", "1 row, 32 conn"),
    )
    if mlflow32 is not None:
        r = ratio(ours_req_s, mlflow32.req_s)
        out.append(("at least 20x `mlflow models serve` (1 row, 32 conn)", r >= 20, f"{r:.1f}x"))
    if stock32 is not None:
        r = ratio(ours_req_s, stock32.req_s)
        out.append(("at least 3x the stock BentoML service (1 row, 32 conn)", r >= 3, f"{r:.1f}x"))
    big_load = f"{BIG_ROWS} rows, {BIG_CONNECTIONS} conn"
    bigs = [
        (label, b)
        for label, b in (
            ("JSON rows", get("ours", big_load)),
            ("columnar JSON", get("ours, columnar JSON", big_load)),
            ("Arrow", get("ours, Arrow", big_load)),
        )
        if b is not None
    ]
    best_label, best = max(bigs, key=lambda lb: lb[1].rows_s)
    r = ratio(best.rows_s, compute["onnx_runtime"])
    listed = ", ".join(
        f"{label} {ratio(b.rows_s, compute['onnx_runtime']):.0%}" for label, b in bigs
    )
    out.append(
        (
            f"{BIG_ROWS}-row requests >= 60% of in-process ONNX Runtime rows/s",
            r >= 0.6,
            f"{r:.0%} with {best_label} ({best.rows_s:,.0f} vs {compute['onnx_runtime']:,.0f} "
            f"rows/s); {listed}",
        )
    )
    all_ours = [x for x in results + rounds if x.server.startswith("ours")]
    out.append(
        (
            "ours: zero non-2xx in every load",
            all(x.non_2xx == 0 and x.socket_errors == 0 for x in all_ours),
            f"{sum(x.non_2xx for x in all_ours)} non-2xx in {len(all_ours)} loads",
        )
    )
    return out


# --- main ----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="per load (default 8)")
    parser.add_argument("--max-requests", type=int, default=200_000, help="per load, cap")
    parser.add_argument("--profile", action="store_true", help="py-spy our worker at 32 conn")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--tail-ab",
        action="store_true",
        help="only the tail A/B: ours and the floor at 32 conn, wrk sharing the CPUs with "
        "them against wrk on a CPU of its own (prints, writes nothing)",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="mlgate-bench-serving-"))
    try:
        return tail_ab(args, work) if args.tail_ab else run(args, work, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        out = subprocess.run(["pgrep", "-P", str(p)], capture_output=True, text=True).stdout
        todo += [int(c) for c in out.split()]
    return tree


def pin(pid: int, cpus: str) -> None:
    """Every thread of `pid` and of its descendants onto the CPUs `cpus`."""
    for p in process_tree(pid):
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(p)], capture_output=True)


def tail_ab(args: argparse.Namespace, work: Path) -> int:
    """The tail's A/B on this host: ours and the floor, single rows at 32 connections,
    rounds alternating A (wrk and the servers on all CPUs), B (wrk on the last CPU alone,
    the servers on the others) and C (wrk on the last CPU, the servers on all). If the tail
    is the service's own work (collections, timers, the batcher's wait), B keeps it; if it
    is the load generator taking the CPU from the event loop, B removes it from ours and
    from the floor alike."""
    cpus = os.cpu_count() or 1
    if cpus < 2 or shutil.which("taskset") is None:
        print("the tail A/B needs 2 CPUs and taskset", file=sys.stderr)
        return 2
    last, rest = str(cpus - 1), f"0-{cpus - 2}"
    every = f"0-{cpus - 1}"
    print("training the churn model ...", flush=True)
    prep = prepare(work)
    rows, cfg = prep["rows"], prep["cfg"]
    SCHEMA[:] = [input_schema(cfg.dataset)]
    env = base_env()
    auth = {"Authorization": f"Bearer {BENCH_TOKEN}"}
    ours_env = {
        **env,
        CONFIG_PATH_ENV: str(prep["config_path"]),
        MODEL_OVERRIDE_ENV: str(ModelRef(cfg.registry.model_name, alias=CHAMPION_ALIAS)),
        "BENTOML_HOME": str(work / "bentoml-ours"),
    }
    ports = [free_port(), free_port()]
    where = ["--host", "127.0.0.1", "--port"]
    ours_cmd = [PY, "-m", "bentoml", "serve", "services.bento_service:MlgateService"]
    ours_cmd += ["--working-dir", str(REPO), *where, str(ports[0])]
    floor_cmd = [PY, "-m", "uvicorn", FLOOR_APP, "--app-dir", str(REPO), "--workers", "1"]
    floor_cmd += ["--log-level", "warning", "--no-access-log", *where, str(ports[1])]
    ours = Server("ours", f"http://127.0.0.1:{ports[0]}", "/predict", auth)
    floor = Server("floor", f"http://127.0.0.1:{ports[1]}", "/predict")
    results: dict[tuple[str, str], list[LoadResult]] = {}
    with contextlib.ExitStack() as stack:
        procs = {}
        for server, cmd, server_env, cwd, headers in (
            (ours, ours_cmd, ours_env, REPO, auth),
            (floor, floor_cmd, env, work, {}),
        ):
            log = work / f"{server.name}.log"
            proc = stack.enter_context(running(cmd, server_env, cwd, log))
            probe = {"json": {"rows": rows[:1]}, "headers": headers}
            wait_until(server.url + server.path, proc, log, probe)
            procs[server.name] = proc
        for server in (ours, floor):
            one, _ = bodies(server, rows, work)
            run_wrk(server, one, WRK_SCRIPT, 8, 1.0, args.max_requests, 1, "warm-up")
        print(f"load average before: {foreign_load()}", flush=True)
        for i in range(ROUNDS):
            for variant, server_cpus, wrk_cpus in (
                ("A: shared", every, None),
                (f"B: wrk on CPU {last}", rest, last),
                (f"C: wrk on CPU {last}, servers free", every, last),
            ):
                for server in (ours, floor):
                    pin(procs[server.name].pid, server_cpus)
                    r = run_wrk(
                        server,
                        work / f"{server.name}-1.body",
                        WRK_SCRIPT,
                        32,
                        args.seconds,
                        args.max_requests,
                        1,
                        f"round {i + 1}",
                        cpus=wrk_cpus,
                    )
                    pin(procs[server.name].pid, every)
                    results.setdefault((server.name, variant), []).append(r)
                    print(
                        f"  {variant:<30} {server.name:>6} {r.load:<8} {r.req_s:>8,.0f} req/s  "
                        f"p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms  "
                        f"p99/p50 {ratio(r.p99_ms, r.p50_ms):4.1f}x  non-2xx {r.non_2xx}",
                        flush=True,
                    )
        print(f"load average after: {foreign_load()}", flush=True)
    print("\nmedian of the rounds (p99/p50 of the round with the median req/s):")
    for (name, variant), runs in results.items():
        mid = sorted(runs, key=lambda r: r.req_s)[len(runs) // 2]
        tails = ", ".join(f"{ratio(x.p99_ms, x.p50_ms):.1f}x" for x in runs)
        print(
            f"  {variant:<30} {name:>6} {mid.req_s:>8,.0f} req/s  p50 {mid.p50_ms:.2f} ms  "
            f"p99 {mid.p99_ms:.2f} ms  p99/p50 {ratio(mid.p99_ms, mid.p50_ms):.1f}x "
            f"(rounds: {tails})"
        )
    return 0


def run(args: argparse.Namespace, work: Path, started: float) -> int:
    load_before = foreign_load()
    print("training the churn model and preparing the four servers ...", flush=True)
    prep = prepare(work)
    rows = prep["rows"]
    cfg = prep["cfg"]
    schema = input_schema(cfg.dataset)
    SCHEMA[:] = [schema]
    script = WRK_SCRIPT
    env = base_env()
    results: list[LoadResult] = []
    rounds: list[LoadResult] = []
    skipped: list[str] = []
    profile: dict[str, float] | str = "not run (--profile)"

    compute = in_process_rows_per_s(prep["model_dir"], schema, rows)
    print(
        f"in-process ONNX Runtime, {BIG_ROWS}-row batches: {compute['onnx_runtime']:,.0f} rows/s "
        f"(with the encoder: {compute['encode_and_onnx_runtime']:,.0f})",
        flush=True,
    )

    auth = {"Authorization": f"Bearer {BENCH_TOKEN}"}
    probe = {"json": {"rows": rows[:1]}, "headers": auth}

    # 1. ours, BentoML's path alone, the floor and the two
    # peers users pick (BentoML with ONNX Runtime and a batchable API; MLServer with adaptive
    # batching), up together: the goal loads alternate between them in rounds, so that
    # their ratios share the host's conditions.
    ours_env = {
        **env,
        CONFIG_PATH_ENV: str(prep["config_path"]),
        MODEL_OVERRIDE_ENV: str(ModelRef(cfg.registry.model_name, alias=CHAMPION_ALIAS)),
        "BENTOML_HOME": str(work / "bentoml-ours"),
    }
    const_env = {
        **env,
        "BENTOML_HOME": str(work / "bentoml-constant"),
        "PYTHONPATH": f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
    }
    onnx_env = {
        **const_env,
        "BENTOML_HOME": str(work / "bentoml-onnx"),
        "BENCH_MODEL_DIR": str(prep["model_dir"]),
    }
    ports = [free_port() for _ in range(5)]
    bento = [PY, "-m", "bentoml", "serve"]
    where = ["--host", "127.0.0.1", "--port"]
    ours_cmd = [*bento, "services.bento_service:MlgateService", "--working-dir", str(REPO)]
    const_cmd = [*bento, BENTO_CONSTANT, "--working-dir", str(REPO)]
    onnx_cmd = [*bento, BENTO_ONNX, "--working-dir", str(REPO)]
    floor_cmd = [
        PY,
        "-m",
        "uvicorn",
        FLOOR_APP,
        "--app-dir",
        str(REPO),
        "--workers",
        "1",
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    mls_python = mlserver_python(work / "mlserver-install.log")
    plain = {"json": {"rows": rows[:1]}, "headers": {}}
    ours = Server("ours", f"http://127.0.0.1:{ports[0]}", "/predict", auth)
    constant = Server("BentoML, constant", f"http://127.0.0.1:{ports[1]}", "/predict")
    floor = Server("floor", f"http://127.0.0.1:{ports[2]}", "/predict")
    bento_onnx = Server("BentoML batchable", f"http://127.0.0.1:{ports[3]}", "/predict")
    mlserver = Server(
        "MLServer",
        f"http://127.0.0.1:{ports[4]}",
        f"/v2/models/{MLSERVER_MODEL}/infer",
        body_format="v2",
    )
    with contextlib.ExitStack() as stack:
        up = [
            (ours, [*ours_cmd, *where, str(ports[0])], ours_env, REPO, probe),
            (constant, [*const_cmd, *where, str(ports[1])], const_env, work, plain),
            (floor, [*floor_cmd, *where, str(ports[2])], env, work, plain),
            (bento_onnx, [*onnx_cmd, *where, str(ports[3])], onnx_env, work, plain),
        ]
        if isinstance(mls_python, Path):
            root = mlserver_dir(work, prep["model_dir"], ports[4])
            mls_cmd = [str(mls_python.with_name("mlserver")), "start", str(root)]
            mls_env = {**env, "PYTHONPATH": str(root)}
            mls_probe = {"json": json.loads(encode_body(mlserver, rows[:1], schema)), "headers": {}}
            up.append((mlserver, mls_cmd, mls_env, root, mls_probe))
        else:
            skipped.append(f"MLServer skipped: its venv could not be made ({mls_python})")
            print(skipped[-1], flush=True)
        procs = {}
        for server, cmd, server_env, cwd, _ in up:
            log = work / f"{server.name.replace(' ', '_').replace(',', '')}.log"
            procs[server.name] = (stack.enter_context(running(cmd, server_env, cwd, log)), log)
        live: list[Server] = []
        for server, _, _, _, server_probe in up:
            proc, log = procs[server.name]
            try:
                wait_until(server.url + server.path, proc, log, server_probe)
            except RuntimeError as err:
                if server is ours:
                    raise
                skipped.append(f"{server.name} skipped: it did not start ({str(err)[-300:]})")
                print(skipped[-1], flush=True)
                continue
            live.append(server)
        p1 = procs["ours"][0]
        cpus = os.cpu_count() or 1
        last, rest, every = str(cpus - 1), f"0-{max(0, cpus - 2)}", f"0-{cpus - 1}"

        for server in live:
            one, _ = bodies(server, rows, work)
            run_wrk(server, one, script, 8, 1.0, args.max_requests, 1, "warm-up")
        print(f"goal rounds, 1 row at 32 connections ({ROUNDS} rounds, alternating):", flush=True)
        for i in range(ROUNDS):
            for server in live:
                one = work / f"{server.name}-1.body"
                r = run_wrk(
                    server, one, script, 32, args.seconds, args.max_requests, 1, f"round {i + 1}"
                )
                rounds.append(r)
                print(
                    f"  {server.name:>18} {r.load:<8} {r.req_s:>9,.0f} req/s  "
                    f"p50 {r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms  non-2xx {r.non_2xx}",
                    flush=True,
                )
            # The same load with wrk on a CPU of its own and the server on the others (the
            # tail's A/B, see TAIL): ours and the floor only, the comparisons stay shared.
            for server in (ours, floor):
                if server not in live or cpus < 2:
                    continue
                pin(procs[server.name][0].pid, rest)
                r = run_wrk(
                    server,
                    work / f"{server.name}-1.body",
                    script,
                    32,
                    args.seconds,
                    args.max_requests,
                    1,
                    f"round {i + 1}",
                    cpus=last,
                )
                pin(procs[server.name][0].pid, every)
                r.server = f"{server.name}{OWN_CPU}"
                rounds.append(r)
                print(
                    f"  {r.server:>18} {r.load:<8} {r.req_s:>9,.0f} req/s  "
                    f"p50 {r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms  non-2xx {r.non_2xx}",
                    flush=True,
                )

        def at_c32(s: Server) -> None:
            nonlocal profile
            if not args.profile:
                return
            pid = worker_pid(p1.pid)
            if pid is None:
                profile = "worker not found"
                return
            # Profile a separate, shorter run at 32 connections, so the measured one is clean.
            import threading

            holder: dict[str, Any] = {}
            t = threading.Thread(
                target=lambda: holder.setdefault(
                    "r", profile_worker(pid, min(6.0, args.seconds), work / "ours.spy")
                )
            )
            t.start()
            run_wrk(
                s,
                work / "ours-1.body",
                script,
                32,
                min(6.0, args.seconds) + 1,
                args.max_requests,
                1,
                "profile",
            )
            t.join()
            profile = holder.get("r", "no result")

        results += drive(ours, rows, work, script, args.seconds, args.max_requests, at_c32)
        for fmt, label in (("columns", "columnar JSON"), ("arrow", "Arrow")):
            # A bulk Arrow client reads its answer as Arrow too (README "Bulk requests").
            headers = {**auth, "Accept": ARROW_STREAM} if fmt == "arrow" else auth
            variant = Server(f"ours, {label}", ours.url, ours.path, headers, body_format=fmt)
            results += drive(
                variant, rows, work, script, args.seconds, args.max_requests, connections=(32,)
            )
        for server in live:
            if server not in (ours, constant):
                results += drive(server, rows, work, script, args.seconds, args.max_requests)

    # 2. mlflow models serve
    port = free_port()
    log = work / "mlflow.log"
    cmd = [
        str(Path(PY).with_name("mlflow")),
        "models",
        "serve",
        "-m",
        str(work / "mlflow_model"),
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        "1",
    ]
    with running(cmd, env, work, log) as proc:
        server = Server(
            "mlflow serve", f"http://127.0.0.1:{port}", "/invocations", body_key="dataframe_records"
        )
        wait_until(
            server.url + server.path,
            proc,
            log,
            {"json": {"dataframe_records": rows[:1]}, "headers": {}},
        )
        results += drive(server, rows, work, script, args.seconds, args.max_requests)

    # 3. stock BentoML
    port = free_port()
    log = work / "stock.log"
    cmd = [
        PY,
        "-m",
        "bentoml",
        "serve",
        STOCK_SERVICE,
        "--working-dir",
        str(REPO),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    stock_env = {
        **env,
        "BENCH_PIPELINE": str(work / "pipeline.joblib"),
        "BENTOML_HOME": str(work / "bentoml-stock"),
    }
    with running(cmd, stock_env, work, log) as proc:
        server = Server("stock BentoML", f"http://127.0.0.1:{port}", "/predict")
        wait_until(server.url + server.path, proc, log, {"json": {"rows": rows[:1]}, "headers": {}})
        results += drive(server, rows, work, script, args.seconds, args.max_requests)

    verdicts = goals(results, rounds, compute)
    elapsed = time.monotonic() - started
    lines = render(
        results,
        rounds,
        compute,
        verdicts,
        profile,
        prep["estimator"],
        elapsed,
        args,
        skipped,
        load_before,
    )
    print("\n" + "\n".join(lines))
    if not args.no_write:
        write_section(SECTION, "\n".join(lines) + "\n")
        print(f"\nwritten to {RESULTS.relative_to(REPO)} ({SECTION})")
    return 0


# Where the single-row tail at 32 connections comes from (issue 17.3), measured with the
# service under wrk: see the text.
TAIL = """Where the single-row tail at 32 connections comes from (separate runs of ours alone
under the same wrk load, 3 x 8 s, with probes injected through a `sitecustomize` module:
`gc.callbacks` timing every collection, a 2 ms event-loop tick recording each gap over
10 ms with the loop thread's CPU time across it, and per-thread CPU time from
/proc/PID/task; load average 2.5-3.5 from other work on the host):

- Garbage collection: no collection over 1 ms while serving (all the 30-200 ms gen-2
  pauses happen at start-up, before `freeze_heap`); not the tail any more.
- Timers: the metrics flush (1 s) took 0.2 ms on average, 0.5 ms at most; the alias and
  shadow registry polls used 0.01-0.03 s of CPU per 8 s.
- The batcher's wait: none; a drain starts in the same loop turn (batches of 1-32 rows
  scored inline).
- The event loop thread: 442 gaps over 10 ms in 24 s, 440 of them with the loop thread
  holding less than half of the gap in CPU time: it was off the CPU (the loop thread used
  92% of one core; wrk and the rest of the host share the other), not running our code.
  The one other busy thread is the inference log writer, 5% of a core (building its
  Arrow tables); `sys.setswitchinterval(0.001)` against the default 5 ms made no
  difference beyond the run-to-run noise (tail ratios 5.0, 3.0, 2.9 and 6.2, 11.8, 3.9
  against 3.0, 5.3, 17.2 at load average 4-5), so nothing was changed for it.
- The inference log writer: ours with and without `serving.inference_log_dir`, both up,
  rounds alternating (8 s, 32 connections, load average 2.6-2.8): with the log 5.0x, 2.8x,
  4.4x (3,954, 4,419, 3,916 req/s); without 5.7x, 3.9x, 3.8x (3,776, 4,007, 3,929): not
  the tail.
- The load generator: `bench/serving.py --tail-ab` (ours and the floor, 1 row at 32
  connections, 8 s loads, 3 rounds alternating A: wrk and the servers on both CPUs, as the
  full run; B: wrk on CPU 1 alone, the server on CPU 0; C: wrk on CPU 1, the server on
  both). p99/p50 of each round, first run (load average 1.1 before, 1.7 after): A ours
  2.5x, 4.4x, 4.7x (median round 4.4x, 3,608 req/s), the floor 3.8x, 2.0x, 2.7x; B ours
  2.7x, 3.0x, 3.1x (median 3.0x, 4,259 req/s: faster on one CPU than on two shared with
  wrk), the floor 3.1x, 3.0x, 2.7x. Second run (load average 1.3 before, 2.7 after, other
  work starting in round 2): A ours 4.0x, 5.1x, 3.9x, the floor 2.6x, 14.3x, 3.7x; B ours
  2.9x, 7.2x (the disturbed round), 3.3x, the floor 2.7x, 33.1x, 2.8x; C ours 4.9x, 4.9x,
  4.6x, the floor 18.2x, 3.0x, 2.5x. With the event loop on a CPU wrk does not use, ours'
  tail falls to the floor's own (about 3x: one wrk thread and 32 connections against an
  event loop that answers in bursts); sharing the CPUs with wrk adds the rest. So the
  remaining tail is the load generator on the same 2 cores, not work in the service, and
  nothing in services/ was changed for it. The goal rounds therefore also run ours and the
  floor with wrk on a CPU of its own (rows *wrk on its own CPU* above); the peers are
  compared on the shared rounds only, since pinning a two-process peer (MLServer) to one
  CPU would change what is compared.
- Later, on a quieter host (the floor at 16,500 req/s, ours at 7,400), the inference log
  turned out to be part of the tail after all: every 0.5 s its writer built the queued
  single rows into Arrow tables 2,048 rows at a time, each build holding the GIL for
  4.5 ms (measured in process), so every request in flight during one waited that long.
  Two of ours up at once, differing only in the chunk (a temporary environment switch),
  six alternating rounds of 8 s at 32 connections: 2,048-row chunks p99/p50 3.1-4.3x
  (median 3.8x), 256-row chunks (0.55 ms each, followed by a pause as long) 2.4-2.9x
  (median 2.5x), the same req/s. services/inference_log.py builds 256 rows at a time since.
"""


# One-off measurements from the investigation that shaped services/ (same host, one run
# each, single-row requests at 32 connections unless said); they explain the table above.
INVESTIGATION = """Investigation notes (separate runs on the same host while building
services/; the floor answered 4,000-5,500 req/s in those runs):

- The previous design (a FastAPI route handing rows to a batchable `@bentoml.api` through
  `self.to_async`, pandas `prepare_features`): 168 req/s at 32 connections, p99 499 ms;
  5.8 1,000-row requests/s.
- BentoML's own path, a constant handler mounted with `@bentoml.asgi_app`: 519 req/s with
  default settings; 851 with its metrics middleware and access log off; 2,753 with the
  route also excluded from OpenTelemetry (its middleware alone cost two thirds of the
  path), but p99 104 ms against p50 11 ms.
- That p99 was garbage collection: BentoML's `TimeoutMiddleware` arms a 60 s timer per
  request and never cancels it, so ~160,000 timer handles and futures stay alive and every
  gen-2 collection took 60-115 ms (measured with `gc.callbacks`). Cancelling the timer
  (services/bentoml_fixes.py) took p99 to 19 ms. Freezing the start-up heap and the
  inference log holding Arrow tables rather than Python rows took our gen-2 pauses from up
  to 53 ms to 4-8 ms.
- A FastAPI handler `(request: Request)` inside the mounted app: 1,750 req/s; the same
  route as a plain ASGI endpoint: 2,600.
- py-spy of the first version of ours at 32 connections: FastAPI's middleware stack 13% of
  the event loop, prometheus-client's multiprocess increments 8%, the pandas-free encoder
  and ONNX Runtime 11%.
- 1,000-row requests cut into 256-row ONNX Runtime calls: 49-57 req/s; scored whole: 68-75.
- 1,000-row Arrow requests at 4 connections (ours alone, quieter host, in-process ONNX
  Runtime 338,000 rows/s): 230 req/s with the scoring thread 67% busy and, sampled with
  py-spy, 37% of its time waiting for work: the drain handed it the next batch only once
  the event loop had seen the previous result. Handing it the next batch while it computes
  (services/batcher.py): 256 req/s, the thread 80% busy; more connections (8) the same. What
  holds it back now is the GIL (the event loop 1.5 ms, the inference log 0.5 ms and ONNX
  Runtime's string inputs 0.5 ms of each request); `sys.setswitchinterval` 1 ms or 0.2 ms
  changed nothing. At that rate the inference log drops 0.3-0.5% of rows (counted in
  `mlgate_inference_log_rows_total{outcome="dropped"}`; its queue of 100,000 rows is 0.4 s
  of such traffic); raise `serving.inference_log_max_queued_rows` for bulk traffic.
"""


def render(
    results: list[LoadResult],
    rounds: list[LoadResult],
    compute: dict[str, float],
    verdicts: list[tuple[str, bool, str]],
    profile: dict[str, float] | str,
    estimator: str,
    elapsed: float,
    args: argparse.Namespace,
    skipped: list[str],
    load_before: str,
) -> list[str]:
    lines = [
        SECTION,
        "",
        f"Command: `{COMMAND}` (x86_64, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"one run of the script, {elapsed:.0f} s; 1-minute load average {load_before} at the "
        f"start and {foreign_load()} at the end).",
        "",
        f"The bundled churn model as configured in mlgate.yaml ({estimator}), trained once and "
        "served four ways, each with one worker process: **ours** (`bentoml serve` of "
        "services/, ONNX Runtime, API key checked, inference log written, adaptive batching); "
        "**mlflow serve** (`mlflow models serve` of the scikit-learn pipeline, local env); "
        "**stock BentoML** (default `@bentoml.service`, an `@bentoml.api` calling the "
        "pipeline); **floor** (a bare Starlette app on uvicorn that parses the same JSON and "
        "returns a constant). A fifth row, **BentoML, constant**, mounts the floor's handler "
        "in BentoML with our service's settings (metrics middleware and access log off, "
        "hot path excluded from tracing, timer fix): BentoML's request path with no model "
        "and none of our work. The peers users pick, on the same ONNX export: **BentoML "
        "batchable** (bench/apps/bento_batchable.py: `@bentoml.service`, ONNX Runtime session, "
        "`@bentoml.api(batchable=True)` over a list of rows, BentoML's adaptive batching, "
        "same row encoder as ours, same JSON body) and **MLServer** 1.7.1 (its own venv under "
        "bench/.peers/; it has no ONNX runtime, so a custom runtime holding an ONNX Runtime "
        "session, bench/apps/mlserver_onnx.py; adaptive batching up to 32 requests or 2 ms; "
        "the V2 inference protocol, one input per feature). **ours, columnar JSON** and "
        '**ours, Arrow** are ours with the same rows as `{"columns": ...}` JSON and as an '
        "Arrow IPC stream (answered as Arrow too: `Accept`). Load: wrk, one thread, "
        f"{args.seconds:g} s per load (at most {args.max_requests:,} requests), after a 1 s "
        "warm-up; wrk runs on the same 2 cores.",
        "",
        f"Goal rounds: 1 row at 32 connections, {ROUNDS} rounds alternating ours, BentoML "
        "alone, the floor and the two peers (all up at once); in each round ours and the "
        f"floor once more with wrk on CPU {(os.cpu_count() or 1) - 1} alone and the server "
        "on the other(s) (`taskset`; rows marked *wrk on its own CPU*, see the tail notes "
        "below):",
        "",
        *table(rounds),
        "",
        "Every load:",
        "",
        *table(results),
        "",
        f"In-process ONNX Runtime (one thread, {BIG_ROWS}-row batches, median): "
        f"**{compute['onnx_runtime']:,.0f} rows/s**; with our row encoder in front: "
        f"{compute['encode_and_onnx_runtime']:,.0f} rows/s.",
        "",
        "| goal | met | measured |",
        "| --- | --- | --- |",
        *(f"| {g} | {'yes' if ok else '**no**'} | {m} |" for g, ok, m in verdicts),
        "",
        *(f"- {line}" for line in skipped),
        *([""] if skipped else []),
    ]
    if isinstance(profile, dict) and profile:
        lines += [
            "Where our worker's event loop spends its time at 32 connections (py-spy, "
            "share of the event loop thread's samples):",
            "",
            "| part | share |",
            "| --- | ---: |",
            *(f"| {k} | {v:.0f}% |" for k, v in sorted(profile.items(), key=lambda kv: -kv[1])),
            "",
        ]
    else:
        lines += [f"Profile: {profile}.", ""]
    ours_r, const_r, floor_r = (
        paired(rounds, "ours"),
        paired(rounds, "BentoML, constant"),
        paired(rounds, "floor"),
    )
    if ours_r and const_r and floor_r:
        c_f = float(
            np.median([ratio(c.req_s, f.req_s) for c, f in zip(const_r, floor_r, strict=True)])
        )
        o_c = float(
            np.median([ratio(o.req_s, c.req_s) for o, c in zip(ours_r, const_r, strict=True)])
        )
        lines += [
            f"BentoML's request path alone (constant handler, our settings) answered "
            f"{c_f:.0%} of the floor's requests/s (median of the rounds): the ceiling of any "
            f"endpoint served through BentoML on this host. Ours reached {o_c:.0%} of that "
            "ceiling.",
            "",
        ]
    lines += [TAIL, "", INVESTIGATION]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
