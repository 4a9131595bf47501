"""Choosing a candidate on the training part: the holdout is never touched, the best wins,
ties go to the first in config order, and without candidates nothing changes."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from models.candidates import (
    CandidateScore,
    candidate_configs,
    row_ids,
    score_candidate,
    select_candidate,
    split_for_selection,
)
from models.config import CandidateConfig, ConfigError, TrainConfig, load_config
from models.data import DataError, split_data
from tests.conftest import write_config

pytestmark = pytest.mark.fast

FAST = [
    CandidateConfig(estimator="logistic_regression", params={"C": 0.01}),
    CandidateConfig(estimator="gradient_boosting", params={"n_estimators": 30, "max_depth": 2}),
    CandidateConfig(estimator="random_forest", params={"n_estimators": 15}),
]


@pytest.fixture(scope="module")
def train_cfg(bundled_cfg) -> TrainConfig:
    return bundled_cfg.train.model_copy(update={"candidates": tuple(FAST)})


@pytest.fixture(scope="module")
def split(bundled_cfg, churn_df, train_cfg):
    return split_data(churn_df, bundled_cfg.dataset, train_cfg)


@pytest.fixture(scope="module")
def parts(bundled_cfg, split, train_cfg):
    return split_for_selection(split.train, bundled_cfg.dataset, train_cfg)


def _score(index: int, value: float, estimator: str = "mlp") -> CandidateScore:
    return CandidateScore(index, estimator, {}, "roc_auc", value, 0.1, 80, 20)


def test_selection_rows_come_from_the_training_part_never_the_holdout(
    bundled_cfg, split, parts, train_cfg
):
    ds = bundled_cfg.dataset
    holdout = set(row_ids(split.holdout, ds))
    fit, validation = set(row_ids(parts.fit, ds)), set(row_ids(parts.validation, ds))
    assert holdout and fit and validation
    assert not (fit | validation) & holdout
    assert not fit & validation
    assert fit | validation == set(row_ids(split.train, ds))
    assert len(validation) == math.ceil(len(split.train) * train_cfg.selection_size)


def test_selection_split_is_seeded_and_stratified(bundled_cfg, split, parts, train_cfg):
    again = split_for_selection(split.train, bundled_cfg.dataset, train_cfg)
    assert again.validation_hash == parts.validation_hash and again.fit_hash == parts.fit_hash
    other = split_for_selection(
        split.train, bundled_cfg.dataset, train_cfg.model_copy(update={"seed": 1})
    )
    assert other.validation_hash != parts.validation_hash
    target, positive = bundled_cfg.dataset.target, bundled_cfg.dataset.positive_label
    share = (split.train[target] == positive).mean()
    assert abs((parts.validation[target] == positive).mean() - share) < 0.005


def test_without_ids_rows_are_named_by_content(bundled_cfg, split, parts):
    ds = bundled_cfg.dataset.model_copy(update={"id_column": None})
    assert not set(row_ids(parts.validation, ds)) & set(row_ids(split.holdout, ds))


def test_the_best_candidate_on_validation_is_chosen_and_says_why(
    bundled_cfg, split, parts, train_cfg
):
    configs = candidate_configs(train_cfg)
    assert [c.estimator for c in configs] == [c.estimator for c in FAST]
    assert all(c.seed == train_cfg.seed and not c.candidates for c in configs)
    scores = [
        score_candidate(i, c, parts, bundled_cfg.dataset, "roc_auc") for i, c in enumerate(configs)
    ]
    assert all(s.worker == "local" and 0.5 < s.value < 1 for s in scores)
    assert all(
        s.fit_rows == len(parts.fit) and s.validation_rows == len(parts.validation) for s in scores
    )
    selection = select_candidate(scores, parts, bundled_cfg.dataset, len(split.train))
    best = max(scores, key=lambda s: s.value)
    assert selection.chosen == best
    assert f"{best.label} chosen" in selection.reason
    assert f"refit on all {len(split.train)} training rows" in selection.reason
    assert "holdout untouched" in selection.reason
    assert selection.to_dict()["rows"] == {
        "fit": len(parts.fit),
        "validation": len(parts.validation),
        "refit": len(split.train),
    }


def test_a_tie_goes_to_the_first_in_config_order(bundled_cfg, parts):
    scores = [_score(2, 0.81), _score(0, 0.8), _score(1, 0.81), _score(3, 0.81)]
    selection = select_candidate(scores, parts, bundled_cfg.dataset, 100)
    assert selection.chosen.index == 1
    assert selection.ties == (2, 3)
    assert "tied with #2, #3 (first in config order wins)" in selection.reason
    assert [s.index for s in selection.scores] == [0, 1, 2, 3]


def test_an_undefined_metric_never_wins_and_none_defined_is_an_error(bundled_cfg, parts):
    selection = select_candidate(
        [_score(0, math.nan), _score(1, 0.7)], parts, bundled_cfg.dataset, 100
    )
    assert selection.chosen.index == 1 and "undefined for #0" in selection.reason
    with pytest.raises(DataError, match="no candidate has a defined validation roc_auc"):
        select_candidate([_score(0, math.nan)], parts, bundled_cfg.dataset, 100)


def test_bad_params_name_the_candidate(bundled_cfg, parts, train_cfg):
    bad = train_cfg.model_copy(update={"estimator": "mlp", "params": {"no_such": 1}})
    with pytest.raises(DataError, match=r"train\.candidates\[2\] \(mlp\)"):
        score_candidate(2, bad, parts, bundled_cfg.dataset, "roc_auc")


def test_no_candidates_is_todays_single_model(bundled_cfg):
    assert bundled_cfg.train.candidates == ()
    assert candidate_configs(bundled_cfg.train) == ()


def test_candidates_are_validated_like_the_single_model(tmp_path):
    good = write_config(
        tmp_path,
        train={
            "candidates": [
                {"estimator": "mlp", "params": {"alpha": 0.1}},
                {"estimator": "random_forest"},
            ]
        },
    )
    cfg = load_config(good)
    assert [c.estimator for c in cfg.train.candidates] == ["mlp", "random_forest"]
    assert cfg.train.selection_size == 0.2
    cases: list[tuple[dict[str, Any], str]] = [
        ({"candidates": [{"estimator": "svm"}]}, "train.candidates.0.estimator"),
        ({"candidates": [{"estimator": "mlp", "parms": {}}]}, "train.candidates.0.parms"),
        ({"selection_size": 1.0}, "train.selection_size"),
    ]
    for bad, field in cases:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(write_config(tmp_path, train=bad))


def test_the_choice_becomes_the_runs_facts_and_one_nested_run_per_candidate(bundled_cfg, parts):
    """The evidence side (flows/training_evidence.py, plain values): the run is named and
    tagged after the chosen candidate, and each candidate becomes a nested run."""
    from flows.training_evidence import RunFacts, TrainingEvidence, describe_choice
    from models.registry_layout import SELECTION_ARTIFACT

    facts = RunFacts("churn", "churn-gradient_boosting", "d" * 64, None, {"estimator": "x"}, {})
    scores = [_score(0, 0.7, "mlp"), _score(1, 0.8, "random_forest")]
    ran = [dataclasses.replace(s, worker=f"w{s.index}") for s in scores]
    selection = select_candidate(ran, parts, bundled_cfg.dataset, 100)
    chosen = describe_choice(facts, selection)
    assert chosen.run_name == "churn-random_forest" and chosen.selection is selection
    assert chosen.tags["estimator"] == "random_forest" and chosen.tags["selected_candidate"] == "1"
    evidence = TrainingEvidence(chosen, ())
    runs = evidence.nested_runs
    assert [r.tags["worker"] for r in runs] == ["w0", "w1"]
    assert [r.tags["chosen"] for r in runs] == ["false", "true"]
    assert runs[1].metrics["selection.roc_auc"] == 0.8
    assert runs[1].params == {"estimator": "random_forest"}
    assert SELECTION_ARTIFACT in evidence.artifacts("run")
    assert TrainingEvidence(facts, ()).nested_runs == ()
    assert SELECTION_ARTIFACT not in TrainingEvidence(facts, ()).artifacts("run")


def test_dask_without_a_prefect_server_is_refused_before_any_candidate_runs(monkeypatch):
    """Dask workers cannot reach Prefect's embedded API (it lives in the flow's process):
    said plainly, naming the fields, instead of each worker starting an API of its own."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.candidates import run_candidates
    from models.config import DaskConfig

    # The API address may come from the environment or from a harness earlier in the
    # session (tests/flows/conftest.py sets it in Prefect's settings context): clear both.
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with (
        temporary_settings(restore_defaults={PREFECT_API_URL}),
        pytest.raises(ConfigError, match=r"orchestration\.api_url.*dask\.scheduler_address"),
    ):
        run_candidates([], DaskConfig(scheduler_address="tcp://127.0.0.1:1"))
