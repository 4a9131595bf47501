"""Training the candidate configurations (on the Dask workers when a scheduler is set) and
choosing one on the training part, for the training flow.

Each candidate is a task; with `dask.scheduler_address` the tasks go through prefect-dask's
`DaskTaskRunner` to that scheduler's workers, otherwise they run here one after another.
The tasks are handed to the runner directly rather than through a subflow: a subflow's
arguments are sent to the Prefect API as its run's parameters, and these are data frames.
Nothing is written to the registry here: the choice travels in the run's facts and
`flows/registry.py` writes it (nested runs) with the training run at the end.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING, Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.fan_out import run_tasks
from models.candidates import (
    LOCAL,
    CandidateScore,
    SelectionSplit,
    candidate_configs,
    score_candidate,
    select_candidate,
    split_for_selection,
)
from models.config import DaskConfig, DatasetConfig, MlgateConfig, TrainConfig

if TYPE_CHECKING:
    from flows.training_evidence import RunFacts


def train_candidate(
    index: int,
    candidate: TrainConfig,
    parts: SelectionSplit,
    dataset: DatasetConfig,
    metric: str,
) -> CandidateScore:
    """`score_candidate`, saying what ran it: the Dask worker's name and address, or local."""
    worker, address = where_running()
    score = score_candidate(index, candidate, parts, dataset, metric)
    return dataclasses.replace(score, worker=worker, worker_address=address)


def where_running() -> tuple[str, str]:
    """The Dask worker running the caller (name, address), or ("local", "") outside one."""
    if "distributed" not in sys.modules:  # never imported: not on a worker
        return LOCAL, ""
    from distributed import get_worker

    try:
        worker = get_worker()
    except ValueError:
        return LOCAL, ""
    return str(worker.name), str(worker.address)


# Inputs are data frames: hashing them for a cache key costs more than it saves.
fit_candidate = task(name="candidate", task_run_name="candidate-{index}", cache_policy=NO_CACHE)(
    train_candidate
)
split_selection = task(name="selection-split", cache_policy=NO_CACHE)(split_for_selection)


def choose_candidate(
    train_part: pd.DataFrame, cfg: MlgateConfig, facts: RunFacts
) -> tuple[MlgateConfig, RunFacts]:
    """With `train.candidates`: each trained and scored on a split of the training part, the
    best chosen, and returned as the config's `train` (to be refit on the whole training
    part) with facts that record the choice. Without: `cfg` and `facts` unchanged."""
    # Here, not at the top: the Dask workers import this module for `fit_candidate`, and
    # the evidence module would have them import GX, Evidently and MLflow too.
    from flows.training_evidence import describe_choice

    configs = candidate_configs(cfg.train)
    if not configs:
        return cfg, facts
    parts = split_selection(train_part, cfg.dataset, cfg.train)
    metric = cfg.gates.champion.primary_metric
    calls = [
        {"index": i, "candidate": c, "parts": parts, "dataset": cfg.dataset, "metric": metric}
        for i, c in enumerate(configs)
    ]
    scores = run_candidates(calls, cfg.dask)
    selection = select_candidate(scores, parts, cfg.dataset, len(train_part))
    where = ", ".join(f"{s.label} on {s.worker}" for s in selection.scores)
    get_run_logger().info("%s (ran: %s)", selection.reason, where)
    chosen = configs[selection.chosen.index]
    return cfg.model_copy(update={"train": chosen}), describe_choice(facts, selection)


def run_candidates(calls: list[dict[str, Any]], parallel: DaskConfig) -> list[CandidateScore]:
    """`fit_candidate` once per call: on the configured Dask scheduler's workers, side by
    side, or here one after another (`flows.fan_out.run_tasks`)."""
    return run_tasks(fit_candidate, calls, parallel)
