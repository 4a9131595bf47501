"""Choosing among candidate configurations on a validation share of the training part.

The champion gate judges the challenger on the holdout; picking the best of K candidates on
that same holdout would make the winner look better than it is and bias the gate. So the
choice is made inside the training part only: it is cut (stratified, seeded) into a fit
share and a validation share, each candidate is fitted on the first and scored on the second
with the gate's primary metric, and the best (the first in config order on a tie) is then
refit on the whole training part by the caller. Nothing here ever sees the holdout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from sklearn.model_selection import train_test_split

from models.config import DatasetConfig, TrainConfig
from models.data import DataError, encode_target, hash_frame
from models.metrics import metric_value
from models.train import predict_proba, train_model

LOCAL = "local"


@dataclass(frozen=True)
class SelectionSplit:
    """The training part cut in two for the choice: `fit` trains each candidate,
    `validation` scores it."""

    fit: pd.DataFrame
    validation: pd.DataFrame
    fit_hash: str
    validation_hash: str


@dataclass(frozen=True)
class CandidateScore:
    """One candidate fitted on the fit share and scored on the validation share. `worker`
    says what ran it: a Dask worker's name (and `worker_address`), or "local"."""

    index: int
    estimator: str
    params: Mapping[str, Any]
    metric: str
    value: float
    fit_seconds: float
    fit_rows: int
    validation_rows: int
    worker: str = LOCAL
    worker_address: str = ""

    @property
    def label(self) -> str:
        return f"#{self.index} {self.estimator}"


@dataclass(frozen=True)
class Selection:
    """The choice and why: every candidate's score, the chosen one, the rows the choice
    used (ids of the fit and validation shares, all from the training part) and the size
    of the training part the chosen one is refit on."""

    scores: tuple[CandidateScore, ...]
    chosen: CandidateScore
    metric: str
    reason: str
    fit_ids: tuple[str, ...]
    validation_ids: tuple[str, ...]
    fit_hash: str
    validation_hash: str
    refit_rows: int
    ties: tuple[int, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "chosen": self.chosen.index,
            "reason": self.reason,
            "ties": list(self.ties),
            "rows": {
                "fit": len(self.fit_ids),
                "validation": len(self.validation_ids),
                "refit": self.refit_rows,
            },
            "fit_hash": self.fit_hash,
            "validation_hash": self.validation_hash,
            "candidates": [
                {
                    "index": s.index,
                    "estimator": s.estimator,
                    "params": dict(s.params),
                    "value": s.value,
                    "fit_seconds": s.fit_seconds,
                    "worker": s.worker,
                    "worker_address": s.worker_address,
                }
                for s in self.scores
            ],
            "fit_ids": list(self.fit_ids),
            "validation_ids": list(self.validation_ids),
        }


def candidate_configs(train: TrainConfig) -> tuple[TrainConfig, ...]:
    """Each of `train.candidates` as a complete training config (split and seed shared);
    none without candidates: the single model of `train.estimator`/`train.params`."""
    return tuple(
        train.model_copy(
            update={"estimator": c.estimator, "params": dict(c.params), "candidates": ()}
        )
        for c in train.candidates
    )


def split_for_selection(
    train_part: pd.DataFrame, dataset: DatasetConfig, train: TrainConfig
) -> SelectionSplit:
    """The training part (only) cut into fit and validation shares, stratified on the
    target and seeded with `train.seed`; `train.selection_size` goes to validation."""
    y = encode_target(train_part, dataset)
    try:
        fit, validation = train_test_split(
            train_part, test_size=train.selection_size, random_state=train.seed, stratify=y
        )
    except ValueError as err:
        raise DataError(
            f"the training part ({len(train_part)} rows) cannot be split for choosing a "
            f"candidate (train.selection_size {train.selection_size}): {err}"
        ) from None
    return SelectionSplit(
        fit=fit,
        validation=validation,
        fit_hash=hash_frame(fit.reset_index(drop=True)),
        validation_hash=hash_frame(validation.reset_index(drop=True)),
    )


def score_candidate(
    index: int,
    candidate: TrainConfig,
    parts: SelectionSplit,
    dataset: DatasetConfig,
    metric: str,
) -> CandidateScore:
    """Fit one candidate on the fit share and score it on the validation share."""
    try:
        model = train_model(parts.fit, dataset, candidate)
    except DataError as err:
        raise DataError(f"train.candidates[{index}] ({candidate.estimator}): {err}") from None
    scores = predict_proba(model.pipeline, parts.validation, dataset)
    return CandidateScore(
        index=index,
        estimator=candidate.estimator,
        params=dict(candidate.params),
        metric=metric,
        value=metric_value(metric, encode_target(parts.validation, dataset), scores),
        fit_seconds=model.fit_seconds,
        fit_rows=len(parts.fit),
        validation_rows=len(parts.validation),
    )


def select_candidate(
    scores: Sequence[CandidateScore],
    parts: SelectionSplit,
    dataset: DatasetConfig,
    refit_rows: int,
) -> Selection:
    """The candidate with the highest validation metric (every primary metric reads larger
    is better); on a tie the first in config order. A candidate whose metric is undefined
    (NaN) cannot win; none defined is an error, not a guess."""
    ordered = sorted(scores, key=lambda s: s.index)
    if not ordered:
        raise DataError("no candidate to choose from (train.candidates is empty)")
    metric = ordered[0].metric
    finite = [s for s in ordered if math.isfinite(s.value)]
    if not finite:
        raise DataError(
            f"no candidate has a defined validation {metric}: "
            + ", ".join(f"{s.label} {s.value}" for s in ordered)
        )
    # max keeps the first of equal values: config order breaks ties.
    chosen = max(finite, key=lambda s: s.value)
    ties = tuple(s.index for s in finite if s.value == chosen.value and s is not chosen)
    return Selection(
        scores=tuple(ordered),
        chosen=chosen,
        metric=metric,
        reason=_reason(ordered, chosen, ties, parts, refit_rows),
        fit_ids=row_ids(parts.fit, dataset),
        validation_ids=row_ids(parts.validation, dataset),
        fit_hash=parts.fit_hash,
        validation_hash=parts.validation_hash,
        refit_rows=refit_rows,
        ties=ties,
    )


def row_ids(frame: pd.DataFrame, dataset: DatasetConfig) -> tuple[str, ...]:
    """What names a row across splits: its id column, else a hash of its content (the
    splits renumber their index, so row labels would not)."""
    if dataset.id_column:
        return tuple(frame[dataset.id_column].astype(str))
    hashed = pd.util.hash_pandas_object(frame, index=False)
    return tuple(f"{h:016x}" for h in hashed.to_numpy())


def _reason(
    ordered: Sequence[CandidateScore],
    chosen: CandidateScore,
    ties: tuple[int, ...],
    parts: SelectionSplit,
    refit_rows: int,
) -> str:
    metric = chosen.metric
    others = [s for s in ordered if s is not chosen]
    runner_up = max(
        (s for s in others if math.isfinite(s.value)), key=lambda s: s.value, default=None
    )
    text = (
        f"{chosen.label} chosen: best validation {metric} {chosen.value:.4f} of "
        f"{len(ordered)} candidate(s)"
    )
    if ties:
        text += f", tied with {', '.join(f'#{i}' for i in ties)} (first in config order wins)"
    elif runner_up is not None:
        text += f", next {runner_up.label} {runner_up.value:.4f}"
    undefined = [s.label for s in others if not math.isfinite(s.value)]
    if undefined:
        text += f"; undefined for {', '.join(undefined)}"
    return (
        f"{text}; fitted on {len(parts.fit)} and scored on {len(parts.validation)} rows of "
        f"the training part, holdout untouched; refit on all {refit_rows} training rows"
    )
