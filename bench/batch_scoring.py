"""Batch scoring of 1M rows, Parquet to Parquet: the `score` flow end to end against ONNX
Runtime alone on the same rows, in one process.

A throwaway registry gets the bundled config's model from the training flow (so the version
carries its reference profile and histograms, and the flow's gates run as they would). The
bundled churn data is resampled to 1M rows (all columns, with replacement, seeded) and
written as one Parquet file, as pandas writes it. Peers, alternating for `--rounds` rounds:

- **ONNX Runtime in-process**: the registered graph in a session built as the service builds
  it (`make_session`: one intra-op thread), the same rows in batches of the same size, their
  feeds built beforehand and not timed: only `session.run`.
- **`score` flow**: `score_flow(input, output, config)` as `mlgate score` calls it, timed
  from the call to its return: model fetch and sha256 check, plan, read, decode, encode,
  score, Parquet write, gate sample, live data gate, PSI drift and the MLflow run, after
  one untimed run on 10,000 rows.

Apart, not in the ratio: the flow twice more with Prefect's flow heartbeat switched off in
this process (a diagnostic of what that costs, never done by mlgate), and `mlgate score` on
the same file in a fresh process, as a person runs it (imports, Prefect's embedded API start
and all).

Run: .venv/bin/python bench/batch_scoring.py [--rounds N] [--no-write]   (default 3 rounds)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.results import RESULTS, write_section  # noqa: E402
from models.batch import BATCH_ROWS, GATE_SAMPLE_ROWS  # noqa: E402
from models.config import load_config  # noqa: E402

ROWS = 1_000_000
ROUNDS = 3
SECTION = "## Batch scoring (1M rows, Parquet to Parquet)"
COMMAND = ".venv/bin/python bench/batch_scoring.py"
GOAL = 0.70


def write_config(root: Path) -> Path:
    raw = yaml.safe_load((REPO / "mlgate.yaml").read_text())
    raw["dataset"]["path"] = str(REPO / "data" / "churn.parquet")
    raw["registry"]["store_dir"] = str(root / "store")
    path = root / "mlgate.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def resample(n: int, seed: int) -> pd.DataFrame:
    churn = pd.read_parquet(REPO / "data" / "churn.parquet")
    rng = np.random.default_rng(seed)
    return churn.iloc[rng.integers(0, len(churn), n)].reset_index(drop=True)


def load_avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


class OrtPeer:
    """The registered graph alone: the rows' feeds built once, `session.run` timed."""

    def __init__(self, config_path: Path, rows: pd.DataFrame) -> None:
        from models.model_ref import ModelRef
        from models.onnx_export import make_session, onnx_inputs_from_frame
        from models.train import prepare_columns
        from services.model_store import load_registered_model

        cfg = load_config(config_path)
        loaded = load_registered_model(
            cfg.registry.resolved_tracking_uri(), ModelRef(cfg.registry.model_name, version="1")
        )
        self.session = make_session(loaded.content)
        schema = loaded.schema
        # The frame path's feeds, its fixed-width strings made object arrays as the service's
        # encoder feeds them: ONNX Runtime scores those about 2% faster.
        self.feeds = [
            {
                name: values.astype(object) if values.dtype.kind == "U" else values
                for name, values in onnx_inputs_from_frame(
                    prepare_columns(
                        rows.iloc[i : i + BATCH_ROWS], schema["numeric"], schema["categorical"]
                    ),
                    schema,
                ).items()
            }
            for i in range(0, len(rows), BATCH_ROWS)
        ]
        self.scores = self.run()

    def run(self) -> np.ndarray:
        from models.onnx_export import score_onnx

        return np.concatenate([score_onnx(self.session, f) for f in self.feeds])


def timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    load_start = load_avg()
    with tempfile.TemporaryDirectory(prefix="mlgate-bench-batch-") as tmp:
        root = Path(tmp)
        config_path = write_config(root)
        from flows.runtime import use_configured_servers

        prefect_server = use_configured_servers(load_config(config_path))
        from flows.score import score_flow
        from flows.training import training_flow

        if prefect_server is not None:
            prefect_server.wait_ready()

        train_s, trained = timed(lambda: training_flow(config_path=str(config_path)))
        assert trained.accepted and trained.version == "1", trained.reason
        rows = resample(ROWS, seed=7)
        source = root / "rows.parquet"
        rows.to_parquet(source, index=False)
        small = root / "small.parquet"
        rows.head(10_000).to_parquet(small, index=False)
        groups = pq.ParquetFile(source).metadata.num_row_groups
        print(f"training flow {train_s:.1f} s; {ROWS:,} rows in {groups} row group(s)")

        score_flow(str(small), str(root / "small-out.parquet"), str(config_path))
        ort = OrtPeer(config_path, rows)
        output = root / "scores.parquet"
        results = []
        for i in range(args.rounds):
            ort_s, _ = timed(ort.run)
            flow_s, outcome = timed(lambda: score_flow(str(source), str(output), str(config_path)))
            assert outcome.scored == ROWS and outcome.rejected == 0, outcome
            results.append((ort_s, flow_s, outcome))
            print(
                f"round {i + 1}: ORT {ROWS / ort_s:,.0f} rows/s, flow {ROWS / flow_s:,.0f} "
                f"rows/s, ratio {ort_s / flow_s:.2f}"
            )
        written = pd.read_parquet(output)
        parity = float(np.max(np.abs(written["score"].to_numpy() - ort.scores)))
        same_ids = bool((written["customer_id"].to_numpy() == rows["customer_id"]).all())
        gates = {g.name: g.status.value for g in results[-1][2].gates}
        without_heartbeats()
        no_heartbeat = [
            timed(lambda: score_flow(str(source), str(output), str(config_path)))[0]
            for _ in range(2)
        ]
        command = [sys.executable, "-m", "flows.cli", "score", "--input", str(source)]
        command += ["--output", str(root / "cli.parquet"), "--config", str(config_path), "--json"]
        cli_s, done = timed(
            lambda: subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
        )
        cli_scoring_s = float(json.loads(done.stdout)["seconds"])

    text = report(
        results,
        statistics.median(no_heartbeat),
        (cli_s, cli_scoring_s),
        parity,
        same_ids,
        gates,
        load_start,
        load_avg(),
        args.rounds,
    )
    print(text)
    if not args.no_write:
        write_section(SECTION, text)
        print(f"written to {RESULTS.relative_to(REPO)}")


def without_heartbeats() -> None:
    """Prefect 3.8 runs a flow heartbeat thread by default (every 180 s) and joins it at the
    flow's end, where it sleeps in 1 s steps; for the diagnostic only, this process's flow
    runs get none."""
    import prefect.flow_engine as engine

    engine.FlowRunEngine.heartbeat_seconds = property(lambda self: None)


def report(
    results: list[tuple[float, float, Any]],
    no_heartbeat_s: float,
    cli: tuple[float, float],
    parity: float,
    same_ids: bool,
    gates: dict[str, str],
    load_start: str,
    load_end: str,
    rounds: int,
) -> str:
    lines = [
        SECTION,
        "",
        f"Command: `{COMMAND} --rounds {rounds}` ({platform.machine()}, {os.cpu_count()} "
        f"CPUs, Python {platform.python_version()}, one process; load average "
        f"{load_start} before and {load_end} after: other work shared the host).",
        "",
        f"{ROWS:,} rows resampled (seeded) from the bundled churn data, all 21 columns, one "
        "Parquet file as pandas writes it; the bundled config's model (gradient boosting, 150 "
        f"trees of depth 3) from the training flow. Batches of {BATCH_ROWS:,} rows in both "
        "peers. **ONNX Runtime**: the registered graph in a session built as the service "
        "builds it (one intra-op thread), feeds built beforehand, only `session.run` timed. "
        "**`score` flow**: `score_flow(input, output, config)` from call to return: fetch "
        "and sha256 check, plan, read, decode under the row rules, encode, score, write "
        "Parquet (id, score, label, version) and the rejects file, the live data gate and "
        f"PSI drift on a {GATE_SAMPLE_ROWS:,}-row sample, the MLflow run. Rounds alternate "
        "the peers.",
        "",
        "| round | ONNX Runtime s | ONNX Runtime rows/s | flow s | flow rows/s | "
        "flow scoring phase s | flow / ORT rows/s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    ratios = []
    for i, (ort_s, flow_s, outcome) in enumerate(results, 1):
        ratio = ort_s / flow_s
        ratios.append(ratio)
        lines.append(
            f"| {i} | {ort_s:.2f} | {ROWS / ort_s:,.0f} | {flow_s:.2f} | {ROWS / flow_s:,.0f} "
            f"| {outcome.seconds:.2f} | {ratio:.2f} |"
        )
    ort_med = statistics.median(r[0] for r in results)
    flow_med = statistics.median(r[1] for r in results)
    phase_med = statistics.median(r[2].seconds for r in results)
    verdict = "meets" if ort_med / flow_med >= GOAL else "misses"
    lines += [
        f"| **median** | {ort_med:.2f} | {ROWS / ort_med:,.0f} | {flow_med:.2f} | "
        f"{ROWS / flow_med:,.0f} | | **{ort_med / flow_med:.2f}** |",
        "",
        f"Median ratio {ort_med / flow_med:.2f} against the goal of {GOAL:.2f}: the flow "
        f"{verdict} it (per round {min(ratios):.2f} to {max(ratios):.2f}). The scoring phase "
        "(partitions and join) reads and decodes the next batch on a helper thread and writes "
        "the one before on another while ONNX Runtime scores, so it runs at "
        f"{ort_med / phase_med:.2f} of ONNX Runtime alone (median). The rest, "
        f"{flow_med - phase_med:.2f} s (median), is paid once per run whatever its size: "
        "Prefect's flow and task runs (among them up to 1 s at the flow's end, where Prefect "
        "3.8 joins its flow heartbeat thread, which sleeps in 1 s steps), the live data gate "
        "(Great Expectations) and PSI drift on the sample, and the MLflow run. With Prefect's "
        f"heartbeat switched off in the process (diagnostic only), the flow took "
        f"{no_heartbeat_s:.2f} s (median of 2): ratio {ort_med / no_heartbeat_s:.2f}. The "
        "heartbeat's join ends the flow at the next whole second of its run, so the ratio "
        "moves in steps with the flow's own work, not smoothly: "
        + (
            "at 1M rows on this host the flow lands at the goal's line, not clear of it."
            if min(ratios) < GOAL + 0.03
            else "a second more of the flow's work (a slower or busier host) is a whole "
            f"step, {ort_med / (flow_med + 1):.2f} here."
        ),
        "",
        f"`mlgate score` on the same file in a fresh process: {cli[0]:.1f} s wall "
        f"({ROWS / cli[0]:,.0f} rows/s), of which the scoring phase {cli[1]:.1f} s; the rest "
        "is the imports (Prefect, MLflow, Great Expectations, scikit-learn) and Prefect's "
        "embedded API start, paid once per command.",
        "",
        f"Checks: the output's scores equal ONNX Runtime's within {parity:.1e} (max abs "
        f"difference), its ids are the input's in order: {same_ids}; gates on the last "
        f"round: {', '.join(f'{k} {v}' for k, v in gates.items())}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
