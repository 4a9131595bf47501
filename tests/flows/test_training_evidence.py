"""The assembly of a training run's evidence (`flows/training_evidence.py`) on hand-made
values: what a stopped run and a judged challenger leave, by path in the registry's layout,
and which of them can become a version."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from checks.champion import ScoredModel
from checks.result import GateResult, GateStatus
from flows.training_evidence import (
    CandidateEvidence,
    RunFacts,
    ScoredHoldout,
    TrainingEvidence,
    stopped_evidence,
)
from models.onnx_export import OnnxModel
from models.registry_layout import (
    CONFIG_ARTIFACT,
    DATA_DOCS_ARTIFACT_DIR,
    DRIFT_ARTIFACT,
    HISTOGRAMS_ARTIFACT,
    MODEL_ARTIFACT_DIR,
    PROFILE_ARTIFACT,
    REPORT_ARTIFACT,
    SAMPLE_ARTIFACT,
)

pytestmark = pytest.mark.fast

USES_PREFECT = False  # plain values: no Prefect API to start

PASS, FAIL = GateStatus.PASS, GateStatus.FAIL
FACTS = RunFacts(
    model_name="churn",
    run_name="churn-gradient_boosting",
    data_hash="d" * 64,
    champion_version="1",
    tags={"data_hash": "d" * 64, "git_commit": "abc", "estimator": "gradient_boosting"},
    config={"train": {"estimator": "gradient_boosting"}},
)
DOCS = {"index.html": b"<html>docs</html>"}
HOLDOUT = ScoredHoldout(
    frame=pd.DataFrame({"tenure": [1.0, 2.0]}),
    holdout_hash="h" * 64,
    y=np.array([0, 1]),
    sklearn_scores=np.array([0.2, 0.7]),
    onnx_scores=np.array([0.2, 0.7]),
    metrics={"roc_auc": 0.8125},
    challenger=ScoredModel(np.array([0.2, 0.7])),
    slices=None,
    params={"estimator": "gradient_boosting", "n_estimators": 5},
    fit_seconds=1.5,
)


def _candidate(identical_to: str | None = None) -> CandidateEvidence:
    return CandidateEvidence(
        onnx=OnnxModel(b"onnx-bytes", "s" * 64),
        model_files={"model.onnx": b"onnx-bytes", "schema.json": b"{}"},
        profile={"columns": {}},
        histograms={"histograms": []},
        sample=b"parquet",
        report="<ul></ul>",
        primary_metric="roc_auc",
        drift=GateResult("drift", PASS, "stable", metrics={"psi.tenure": 0.01, "max_psi": 0.01}),
        identical_to=identical_to,
    )


def test_a_run_stopped_at_the_data_gate_holds_its_config_docs_and_verdict():
    evidence = stopped_evidence(FACTS, [GateResult("data", FAIL, "tenure has nulls")], DOCS)
    assert (evidence.accepted, evidence.stopped_at) == (False, "data")
    assert evidence.reason == "data gate fail: tenure has nulls"
    assert not evidence.registrable and evidence.params == {} and evidence.metrics == {}
    assert evidence.tags == FACTS.tags
    assert evidence.artifacts("r1") == {
        CONFIG_ARTIFACT: json.dumps(FACTS.config, indent=2).encode(),
        f"{DATA_DOCS_ARTIFACT_DIR}/index.html": DOCS["index.html"],
    }


def test_a_run_stopped_at_parity_has_numbers_but_nothing_to_register():
    gates = [GateResult("data", PASS, "ok"), GateResult("parity", FAIL, "max diff 0.1")]
    evidence = stopped_evidence(FACTS, gates, DOCS, HOLDOUT)
    assert evidence.stopped_at == "parity" and not evidence.registrable
    assert evidence.params == HOLDOUT.params
    assert evidence.metrics == {"roc_auc": 0.8125, "fit_seconds": 1.5}
    assert evidence.tags["holdout_hash"] == "h" * 64
    assert MODEL_ARTIFACT_DIR + "/model.onnx" not in evidence.artifacts("r1")


def test_a_judged_challenger_holds_its_model_references_and_titled_report():
    gates = [GateResult("data", PASS, "ok"), GateResult("champion", FAIL, "worse than v1")]
    evidence = TrainingEvidence(FACTS, tuple(gates), DOCS, HOLDOUT, _candidate())
    assert evidence.registrable and not evidence.accepted
    assert evidence.description == "worse than v1"
    assert evidence.metrics["drift_vs_champion.psi.tenure"] == 0.01
    assert evidence.version_tags == {
        "data_hash": "d" * 64,
        "holdout_hash": "h" * 64,
        "git_commit": "abc",
        "estimator": "gradient_boosting",
        "primary_metric": "roc_auc",
        "primary_metric_value": "0.812500",
    }
    artifacts = evidence.artifacts("r42")
    assert set(artifacts) == {
        CONFIG_ARTIFACT,
        f"{DATA_DOCS_ARTIFACT_DIR}/index.html",
        f"{MODEL_ARTIFACT_DIR}/model.onnx",
        f"{MODEL_ARTIFACT_DIR}/schema.json",
        PROFILE_ARTIFACT,
        HISTOGRAMS_ARTIFACT,
        DRIFT_ARTIFACT,
        SAMPLE_ARTIFACT,
        REPORT_ARTIFACT,
    }
    assert b"<h1>churn: challenger from run r42</h1><ul></ul>" in artifacts[REPORT_ARTIFACT]


def test_a_twin_of_the_champion_is_accepted_but_not_registered():
    gates = [GateResult("data", PASS, "ok"), GateResult("champion", PASS, "delta 0")]
    evidence = TrainingEvidence(FACTS, tuple(gates), DOCS, HOLDOUT, _candidate("1"))
    assert evidence.accepted and not evidence.registrable
    assert evidence.tags["identical_to_version"] == "1"
