"""The gate tables (`flows/gate_tables.py`) on small, hand-made gate results: the terminal
tables, the markdown of a model card and the CI job summary of a training run."""

from __future__ import annotations

import pytest
from rich.console import Console

from checks.result import CheckRow, GateResult, GateStatus
from flows.gate_tables import gate_tables, gates_markdown, training_report_markdown

pytestmark = pytest.mark.fast

USES_PREFECT = False  # pure renderers: no Prefect API to start

PASS, FAIL = GateStatus.PASS, GateStatus.FAIL

DATA = GateResult(
    "data",
    PASS,
    "25 of 25 checks passed",
    checks=tuple(CheckRow(f"column c{i} exists", PASS, "yes", "present") for i in range(25)),
)
CHAMPION = GateResult(
    "champion",
    FAIL,
    "roc_auc fell by 0.03 | more than allowed\nagainst champion v1",
    metrics={
        "challenger_roc_auc": 0.81,
        "champion_roc_auc": 0.84,
        "delta": -0.03,
        "delta_ci_low": -0.045,
        "delta_ci_high": -0.012,
    },
    evidence={
        "primary_metric": "roc_auc",
        "champion_version": "1",
        "bootstrap": {"confidence": 0.9},
    },
    checks=(
        CheckRow("roc_auc floor", PASS, "0.8100", ">= 0.7"),
        CheckRow("roc_auc vs champion", FAIL, "-0.0300", ">= -0.01", "paired bootstrap"),
    ),
)


def _text(renderable: object) -> str:
    console = Console(record=True, width=200)
    console.print(renderable)
    return console.export_text()


def test_gate_tables_show_every_check_of_a_gate_that_did_not_pass():
    text = _text(gate_tables([DATA, CHAMPION]))
    assert "gate: champion" in text and "roc_auc vs champion" in text
    assert "paired bootstrap" in text and "FAIL" in text and "PASS" in text
    # The data gate passed with more checks than the limit: its summary line only.
    assert "25 of 25 checks passed" in text and "gate: data" not in text
    assert "column c0 exists" not in text
    everything = _text(gate_tables([DATA, CHAMPION], max_passed_rows=None))
    assert "gate: data" in everything and "column c24 exists" in everything


def test_gates_markdown_escapes_the_table_and_lists_the_checks():
    md = gates_markdown([DATA, CHAMPION, GateResult("parity", PASS, "max diff 1e-07")])
    lines = md.splitlines()
    assert lines[:2] == ["| gate | status | reason |", "| --- | --- | --- |"]
    # A pipe or a line break in a reason would break the row.
    assert lines[3] == (
        "| champion | fail | roc_auc fell by 0.03 \\| more than allowed against champion v1 |"
    )
    assert lines[4] == "| parity | pass | max diff 1e-07 |"
    assert "### champion" in lines and "### parity" not in lines
    assert "| roc_auc vs champion | fail | -0.0300 | >= -0.01 |" in lines
    assert md.endswith("\n")


def test_training_report_of_a_rejected_challenger():
    md = training_report_markdown(
        model_name="churn",
        run_id="abc123",
        tags={
            "mlgate.outcome": "rejected",
            "mlgate.stopped_at": "champion",
            "model_version": "2",
            "data_hash": "d" * 64,
            "git_commit": "0123456789abcdef",
        },
        metrics={"roc_auc": 0.81, "brier": 0.14, "fit_seconds": 3.0},
        gates=[DATA, CHAMPION],
    )
    assert md.startswith("## ❌ churn: challenger rejected")
    assert "- registered version: 2" in md and "`dddddddddddddddd`" in md
    assert "`0123456789ab`" in md and "stopped at the **champion** gate" in md
    assert "| challenger roc_auc | 0.8100 |" in md
    assert "| champion v1 roc_auc | 0.8400 |" in md
    assert "| difference [90% CI] | -0.0300 [-0.0450, -0.0120] |" in md
    assert "| roc_auc | 0.8100 |" in md and "| brier | 0.1400 |" in md
    assert "fit_seconds" not in md
    assert md.rstrip().endswith(gates_markdown([DATA, CHAMPION]).rstrip())


def test_training_report_of_a_first_model_and_of_an_identical_one():
    first = GateResult(
        "champion",
        PASS,
        "no champion yet: floor only",
        metrics={"challenger_roc_auc": 0.84},
        evidence={"primary_metric": "roc_auc"},
    )
    md = training_report_markdown(
        model_name="churn",
        run_id="r1",
        tags={"mlgate.outcome": "accepted", "identical_to_version": "1"},
        metrics={},
        gates=[first],
    )
    assert md.startswith("## ✅ churn: challenger accepted")
    assert "- registered version: none" in md
    assert "identical to champion v1: nothing registered" in md
    assert "| champion | none yet: floor only |" in md
    assert "### Holdout metrics" not in md and "stopped at" not in md
