"""`score_flow`: a registered version scores a CSV or Parquet input into a Parquet file, and
the batch is judged and recorded like a monitoring window.

The version is fetched and its sha256 checked (`services.model_store`); the input is planned
in partitions of whole row groups, each streamed in batches and scored with the service's
row rules, encoder and session settings (`models/batch.py`): the output holds the row id
(the configured id column when the input has it, else the ordinal), score, label and model
version of every accepted row, and a rejects file beside it every refused row with its
reason. With `dask.scheduler_address` the partitions run on the Dask workers (the input and
the output's folder must then be on a filesystem they share), otherwise here one after
another. A uniform sample of the scored rows is judged by the monitoring flow's live data
gate and PSI drift against the reference stored with the version, and the batch (counts,
throughput, gates) is recorded as one run of the monitoring experiment.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from checks.result import GateResult, GateStatus
from flows.fan_out import run_tasks
from models.batch import (
    BATCH_ROWS,
    PARTITION_ROWS,
    BatchModel,
    BatchPlan,
    BatchTarget,
    PartitionResult,
    batch_target,
    join_parts,
    join_samples,
    plan_batch,
    score_partition,
)
from models.config import ConfigError, DaskConfig, MlgateConfig, load_config
from models.model_ref import ModelRef

# MLflow, GX and the monitoring flow are imported where they are used: the Dask workers
# import this module for `score_part`, and need none of them.
if TYPE_CHECKING:
    import pandas as pd

    from checks.data_quality import DataProfile
    from models.reference import ReferenceHistograms

BATCH_KIND = "batch_score"  # the `kind` tag of a batch's run in the monitoring experiment


@dataclass
class ScoringOutcome:
    """One scored batch: where it came from and went, its counts, time and gates."""

    model_name: str
    model_version: str
    input: str
    output: str
    rejects: str
    rows: int
    scored: int
    rejected: int
    partitions: int
    seconds: float
    sample_rows: int
    gates: list[GateResult] = field(default_factory=list)
    run_id: str | None = None

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "gates"}
        d["rows_per_s"] = self.rows_per_s
        d["gates"] = [g.to_dict() for g in self.gates]
        return d


@dataclass(frozen=True)
class VersionReference:
    """What was stored with a version to judge live data by; None where it cannot be read,
    with the reason in `errors`."""

    profile: DataProfile | None
    histograms: ReferenceHistograms | None
    errors: dict[str, str] = field(default_factory=dict)


def model_ref(cfg: MlgateConfig, version: str | None, alias: str | None) -> ModelRef:
    """The version or alias asked for, else what the service serves (`cfg.served_model`)."""
    if version is None and alias is None:
        return cfg.served_model()
    return ModelRef(cfg.registry.model_name, alias=alias, version=version)


def fetch_model(cfg: MlgateConfig, ref: ModelRef) -> BatchModel:
    """The version's ONNX graph, its sha256 checked against the registration's tag, trained
    on the features the config lists (the gates judge the config's columns)."""
    from services.model_store import load_registered_model

    loaded = load_registered_model(cfg.registry.resolved_tracking_uri(), ref)
    # The service refuses the same at start-up (services/service.py, which imports BentoML).
    dataset = cfg.dataset
    for kind, configured in (
        ("numeric", dataset.numeric_features),
        ("categorical", dataset.categorical_features),
    ):
        if sorted(loaded.schema[kind]) != sorted(configured):
            raise ConfigError(
                f"model {loaded.ref} was trained on {kind} features "
                f"{sorted(loaded.schema[kind])}, but the config's dataset lists "
                f"{sorted(configured)}; score it with its own config"
            )
    return BatchModel(
        loaded.version,
        loaded.sha256,
        loaded.schema,
        loaded.content,
        gpu_content=loaded.gpu_content,
        gpu_sha256=loaded.gpu_sha256,
    )


def plan_input(
    cfg: MlgateConfig, source: Path, model: BatchModel, partition_rows: int
) -> BatchPlan:
    """The input's partitions, checked for the model's features (metadata only)."""
    return plan_batch(
        source,
        model.schema,
        cfg.dataset.id_column,
        cfg.serving.max_category_chars,
        partition_rows=partition_rows,
    )


@contextmanager
def staging_dir(target: BatchTarget) -> Iterator[Path]:
    """A folder beside the output for the partitions' parts, removed afterwards: a failed
    run leaves neither parts nor a half-written output."""
    target.output.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.output.name}.", dir=target.output.parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def progress_bar(enabled: bool, total: int | None) -> Iterator[Callable[[int], None] | None]:
    """A rich progress bar of rows scored (a terminal's, when `enabled`), as a callback."""
    if not enabled:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("scoring"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as bar:
        rows = bar.add_task("scoring", total=total)
        yield lambda n: bar.advance(rows, n)


def score_partitions(
    plan: BatchPlan,
    model: BatchModel,
    staging: Path,
    parallel: DaskConfig,
    batch_rows: int,
    progress: bool,
) -> list[PartitionResult]:
    """Every partition through `score_part`: on the Dask workers when a scheduler is
    configured (the bar then moves a partition at a time), else here, batch by batch."""
    with progress_bar(progress, plan.rows) as advance:
        calls: list[dict[str, Any]] = [
            {
                "partition": partition,
                "layout": plan.layout,
                "model": model,
                "out_dir": str(staging),
                "batch_rows": batch_rows,
            }
            for partition in plan.partitions
        ]
        if parallel.scheduler_address is None and advance is not None:
            for call in calls:
                call["on_batch"] = advance
            return run_tasks(score_part, calls, parallel)
        on_result = (lambda r: advance(r.rows)) if advance is not None else None
        return run_tasks(score_part, calls, parallel, on_result=on_result)


def read_reference(cfg: MlgateConfig, version: str) -> VersionReference:
    """The data profile and reference histograms stored with the version's training run."""
    from checks.data_quality import DataProfile
    from flows import registry
    from models.reference import ReferenceHistograms

    client = registry.connect(cfg.registry)
    try:
        run_id = str(client.get_model_version(cfg.registry.model_name, version).run_id)
    except Exception as err:
        why = f"version {version} unreadable: {err}"
        return VersionReference(None, None, {"data": why, "drift": why})
    errors: dict[str, str] = {}
    profile, histograms = None, None
    try:
        profile = DataProfile.from_dict(
            registry.load_json_artifact(client, run_id, registry.PROFILE_ARTIFACT)
        )
    except Exception as err:
        errors["data"] = f"reference profile of version {version} unreadable: {err}"
    try:
        histograms = ReferenceHistograms.from_dict(
            registry.load_json_artifact(client, run_id, registry.HISTOGRAMS_ARTIFACT)
        )
    except Exception as err:
        errors["drift"] = f"reference histograms of version {version} unreadable: {err}"
    return VersionReference(profile, histograms, errors)


def judge_sample(
    cfg: MlgateConfig, sample: pd.DataFrame, reference: VersionReference
) -> list[GateResult]:
    """The monitoring flow's live data gate and PSI drift on the sample of scored rows.
    Without a reference to judge by, a gate is inconclusive, never a pass."""
    from flows.monitoring import run_data_gate, run_drift

    gates: list[GateResult] = []
    if reference.profile is None:
        gates.append(_unjudged("data", reference.errors.get("data", "no reference profile")))
    else:
        data = run_data_gate(sample, cfg.dataset, cfg.gates.data, reference.profile)
        gates.append(data or _unjudged("data", "no row was scored: nothing to gate"))
    if reference.histograms is None:
        gates.append(_unjudged("drift", reference.errors.get("drift", "no reference histograms")))
    else:
        gates.append(run_drift(sample, cfg.dataset, reference.histograms, cfg.gates.drift))
    return gates


def _unjudged(name: str, reason: str) -> GateResult:
    return GateResult(name, GateStatus.INCONCLUSIVE, reason)


def finish_scoring(cfg: MlgateConfig, outcome: ScoringOutcome) -> ScoringOutcome:
    """The batch's only MLflow write: a run of the monitoring experiment, tagged
    `kind=batch_score`, with its counts, throughput and gates."""
    from flows import registry
    from flows.monitoring import MonitoringEvidence

    metrics = {
        "rows": float(outcome.rows),
        "rows_scored": float(outcome.scored),
        "rows_rejected": float(outcome.rejected),
        "partitions": float(outcome.partitions),
        "seconds": outcome.seconds,
        "rows_per_s": outcome.rows_per_s,
        "gate_sample_rows": float(outcome.sample_rows),
    }
    for g in outcome.gates:
        if g.name == "drift":
            metrics.update(g.metrics)
    evidence = MonitoringEvidence(
        run_name=f"score {Path(outcome.input).name} {datetime.now(UTC):%Y-%m-%d %H:%M}",
        tags={
            "kind": BATCH_KIND,
            "model_name": outcome.model_name,
            "model_version": outcome.model_version,
            "input": outcome.input[:5000],
            "output": outcome.output[:5000],
            "rejects": outcome.rejects[:5000],
        },
        gates=tuple(outcome.gates),
        metrics=metrics,
        outcome=outcome.to_dict(),
    )
    client = registry.connect(cfg.registry)
    outcome.run_id = registry.record_monitoring_run(client, cfg.registry, evidence)
    return outcome


def _task(fn: Any, name: str, **kw: Any) -> Any:
    # Inputs are model bytes, plans and tables: hashing them for a cache key costs more
    # than the step, and a cached score would hide a changed input.
    return task(name=name, cache_policy=NO_CACHE, **kw)(fn)


fetch = _task(fetch_model, "fetch-model")
plan = _task(plan_input, "plan-partitions")
score_part = task(
    name="score-partition", task_run_name="partition-{partition.index}", cache_policy=NO_CACHE
)(score_partition)
join = _task(join_parts, "join-parts")
read_version_reference = _task(read_reference, "read-reference", retries=2, retry_delay_seconds=2)


@flow(name="score_flow", log_prints=True)
def score_flow(
    input_path: str,
    output_path: str,
    config_path: str = "mlgate.yaml",
    version: str | None = None,
    alias: str | None = None,
    progress: bool = False,
    batch_rows: int = BATCH_ROWS,
    partition_rows: int = PARTITION_ROWS,
) -> ScoringOutcome:
    """Score `input_path` (CSV, Parquet, or a folder of Parquet parts) with a version (or
    an alias; default: what the service serves) into `output_path` (Parquet) and the rejects
    file beside it; `progress` draws a bar on the terminal. Throughput is the rows over the
    time from the first partition's start to the output in place."""
    cfg = load_config(config_path)
    source = Path(input_path)
    target = batch_target(Path(output_path), source)
    model = fetch(cfg, model_ref(cfg, version, alias))
    work = plan(cfg, source, model, partition_rows)
    # Read while the batch is scored: only the gates at the end need it.
    reference = read_version_reference.submit(cfg, model.version)
    started = time.perf_counter()
    with staging_dir(target) as staging:
        parts = score_partitions(work, model, staging, cfg.dask, batch_rows, progress)
        join(parts, work.layout, target, staging)
    seconds = time.perf_counter() - started
    sample = join_samples(parts, work.layout).to_pandas()
    outcome = ScoringOutcome(
        model_name=cfg.registry.model_name,
        model_version=model.version,
        input=str(source),
        output=str(target.output),
        rejects=str(target.rejects),
        rows=sum(p.rows for p in parts),
        scored=sum(p.scored for p in parts),
        rejected=sum(p.rejected for p in parts),
        partitions=len(parts),
        seconds=seconds,
        sample_rows=len(sample),
        gates=judge_sample(cfg, sample, reference.result()),
    )
    return finish_scoring(cfg, outcome)
