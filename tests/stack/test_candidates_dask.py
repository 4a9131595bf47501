"""The training flow with four candidates in team mode: the candidates trained on both Dask
workers of the stack (each recorded as a run nested under the training run, with the worker
that ran it), the chosen one refit and judged by the gates, and the choice made on rows of
the training part only, none of the holdout's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows import registry
from models.candidates import row_ids
from models.config import load_config
from models.data import load_dataset, split_data
from models.registry_layout import SELECTION_ARTIFACT
from services import stack as st
from tests.stack.conftest import Team

pytestmark = pytest.mark.stack

REPO = Path(__file__).resolve().parents[2]
# Comparable costs, so that neither worker is free to take them all.
CANDIDATES: list[dict[str, Any]] = [
    {"estimator": "gradient_boosting", "params": {"n_estimators": 60, "max_depth": 2}},
    {"estimator": "gradient_boosting", "params": {"n_estimators": 60, "max_depth": 3}},
    {"estimator": "random_forest", "params": {"n_estimators": 60, "min_samples_leaf": 5}},
    {"estimator": "random_forest", "params": {"n_estimators": 60, "min_samples_leaf": 20}},
]
# As a team-mode host runs a flow: its config's servers applied before Prefect is imported.
RUN_FLOW = """
import json, sys
from flows.runtime import use_team_servers
from models.config import load_config
cfg = load_config(sys.argv[1])
use_team_servers(cfg.registry, cfg.orchestration)
from flows.training import training_flow
print(json.dumps(training_flow(config_path=sys.argv[1]).to_dict(), default=str))
"""


@pytest.fixture()
def mlflow_env(monkeypatch):
    """registry.connect sets the MLflow client's credentials in os.environ; undo it after."""
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "")


@pytest.mark.timeout(1500)
def test_candidates_run_on_both_dask_workers_and_the_choice_never_sees_the_holdout(
    team: Team, mlflow_env, tmp_path
):
    raw = yaml.safe_load(yaml.safe_dump(team.raw))
    raw["registry"].update(
        store_dir=str(tmp_path / "store"),
        model_name="churn_candidates",
        experiment="mlgate-candidates",
    )
    raw["train"] = {**raw["train"], "candidates": CANDIDATES, "selection_size": 0.2}
    config_path = tmp_path / "mlgate.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(config_path)
    assert cfg.dask.scheduler_address == team.cfg.dask.scheduler_address

    out = subprocess.run(
        [sys.executable, "-c", RUN_FLOW, str(config_path)],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    outcome = json.loads(out.stdout.strip().splitlines()[-1])

    client = registry.connect(cfg.registry)
    parent = client.get_run(outcome["run_id"])
    experiment = parent.info.experiment_id
    nested = client.search_runs(
        [experiment], filter_string=f"tags.mlflow.parentRunId = '{outcome['run_id']}'"
    )
    by_index = {int(r.data.tags["candidate_index"]): r for r in nested}
    assert sorted(by_index) == [0, 1, 2, 3]
    ran_on = {i: r.data.tags["worker"] for i, r in sorted(by_index.items())}
    print("\ncandidate -> Dask worker:")
    for i, r in sorted(by_index.items()):
        print(
            f"  #{i} {r.data.params['estimator']:<18} {ran_on[i]:<24} "
            f"{r.data.tags['worker_address']:<24} validation roc_auc "
            f"{r.data.metrics['selection.roc_auc']:.4f} chosen={r.data.tags['chosen']}"
        )
    workers = {p.address for p in st.stack_status(*_slices(team)) if "dask-worker" in p.name}
    assert len(workers) == 2
    assert set(ran_on.values()) == workers, (ran_on, workers)
    assert all(r.data.tags["worker_address"].startswith("tcp://127.0.0.1:") for r in nested)
    assert all(r.info.status == "FINISHED" for r in nested)
    # The nested runs are not training runs of their own.
    assert registry.latest_training_run(client, cfg.registry) == outcome["run_id"]

    # The best on validation was chosen, and that model is what the gates judged.
    best = max(by_index, key=lambda i: (by_index[i].data.metrics["selection.roc_auc"], -i))
    assert [i for i, r in by_index.items() if r.data.tags["chosen"] == "true"] == [best]
    tags, params = parent.data.tags, parent.data.params
    assert tags["selected_candidate"] == str(best)
    assert params == by_index[best].data.params
    chosen = CANDIDATES[best]
    assert params["estimator"] == chosen["estimator"] == tags["estimator"]
    assert {k: params[k] for k in chosen["params"]} == {
        k: str(v) for k, v in chosen["params"].items()
    }
    assert {tags["gate.data"], tags["gate.parity"], tags["gate.champion"]} == {"pass"}
    assert outcome["accepted"] and outcome["version"] == "1", outcome["reason"]
    mv = client.get_model_version(cfg.registry.model_name, outcome["version"])
    assert mv.run_id == outcome["run_id"] and mv.tags["estimator"] == chosen["estimator"]

    # The choice used rows of the training part only: none of the holdout the gates judged.
    selection = registry.load_json_artifact(client, outcome["run_id"], SELECTION_ARTIFACT)
    assert selection["chosen"] == best and "refit on all" in selection["reason"]
    parts = split_data(load_dataset(cfg.dataset), cfg.dataset, cfg.train)
    assert parts.holdout_hash == tags["holdout_hash"]
    holdout = set(row_ids(parts.holdout, cfg.dataset))
    fit, validation = set(selection["fit_ids"]), set(selection["validation_ids"])
    assert (
        len(fit) == selection["rows"]["fit"] and len(validation) == selection["rows"]["validation"]
    )
    assert not (fit | validation) & holdout
    assert fit | validation == set(row_ids(parts.train, cfg.dataset))
    assert selection["rows"]["refit"] == len(parts.train)


def _slices(team: Team) -> tuple:
    return team.cfg.stack, team.cfg.registry, team.cfg.orchestration, team.cfg.dask
