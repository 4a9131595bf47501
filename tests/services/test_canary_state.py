"""The controller's bookkeeping where no process needs to run: the check-and-set into
PROMOTING against an abort, the successor canary of a candidate that arrived while the
previous one was finishing, and which candidate may replace which.

The registry here is an in-memory `CanaryRegistry` (the protocol the controller is written
against): these cases are about the state file, and the MLflow side of the same calls is
exercised in tests/services/test_canary.py and tests/flows/test_training_canary.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from checks.canary import CanaryStep
from checks.result import CheckRow, GateResult, GateStatus
from flows.canary import pass_tags, rollback_tags, superseded_tags
from models.config import load_config
from services.canary import Controller, _Decided, start_canary
from services.canary_state import (
    CanaryError,
    CanaryState,
    Phase,
    StateStore,
    canary_paths,
    final_state_for,
)
from tests.conftest import write_config

pytestmark = pytest.mark.fast


class MemoryRegistry:
    """The protocol in memory, tagging as `MlflowCanaryRegistry` does."""

    def __init__(self, champion: str | None) -> None:
        self.champion = champion
        self.tags: dict[str, dict[str, str]] = {}
        self.results: list[tuple[str, GateResult]] = []
        self.notes: list[str] = []
        self.promotions: list[tuple[str, str | None]] = []

    def champion_version(self) -> str | None:
        return self.champion

    def _record(self, version: str, result: GateResult, tags: dict[str, str]) -> None:
        self.tags.setdefault(version, {}).update(tags)
        self.results.append((version, result))

    def record_pass(self, state: CanaryState, summary: GateResult) -> None:
        self._record(state.candidate_version, summary, pass_tags(state, summary))

    def record_rollback(self, state: CanaryState, result: GateResult) -> None:
        self._record(state.candidate_version, result, rollback_tags(state, result))

    def record_superseded(self, state: CanaryState, successor: str, note: GateResult) -> None:
        self._record(state.candidate_version, note, superseded_tags(state, successor))

    def promote(self, version: str, *, expected_from: str | None, reason: str) -> None:
        assert self.champion == expected_from
        self.promotions.append((version, expected_from))
        self.champion = version

    def notify(self, title: str, body: str) -> None:
        self.notes.append(title)


@pytest.fixture
def cfg(tmp_path: Path):  # type: ignore[no-untyped-def]
    return load_config(write_config(tmp_path, canary={"steps": [50, 100], "interval_s": 1.0}))


def _passed_every_step(state: CanaryState) -> None:
    for percent in state.steps:
        result = GateResult(
            "canary",
            GateStatus.PASS,
            f"step {percent}% passed",
            {"step_percent": float(percent), "canary_requests": 100.0},
            checks=(CheckRow("requests per side", GateStatus.PASS, "100", ">= 100"),),
        )
        state.steps_done.append(
            CanaryStep(
                percent=percent,
                result=result,
                candidate_version=state.candidate_version,
                started_at=0.0,
                ended_at=1.0,
                seconds=1.0,
                haproxy={},
            )
        )
    state.step_index = len(state.steps)
    state.phase = Phase.RUNNING


def test_an_abort_written_before_promotion_wins(cfg) -> None:  # type: ignore[no-untyped-def]
    registry = MemoryRegistry(champion="1")
    state = start_canary(cfg, "2", registry)
    _passed_every_step(state)
    store = StateStore(canary_paths(cfg))
    store.save(state)
    # Another process aborts between the last passing window and the move to PROMOTING.
    with store.lock():
        on_disk = store.read()
        assert on_disk is not None
        on_disk.abort_requested = {"reason": "release freeze", "by": "ops", "at": "now"}
        store.write_locked(on_disk)

    controller = Controller(cfg, None, registry)
    with pytest.raises(_Decided):
        controller.enter_promoting(state)
    final = store.read()
    assert final is not None and final.phase == Phase.ROLLED_BACK
    assert final.decision is not None and final.decision["guardrail"] == "abort"
    assert registry.champion == "1" and registry.promotions == []
    assert registry.tags["2"]["gate.canary"] == "fail"
    # Nothing ran, so nothing was started to take traffic away from.
    assert final.haproxy is None and final.weights == {"stable": 100, "canary": 0}


def test_without_an_abort_the_analysis_moves_to_promoting(cfg) -> None:  # type: ignore[no-untyped-def]
    registry = MemoryRegistry(champion="1")
    state = start_canary(cfg, "2", registry)
    _passed_every_step(state)
    controller = Controller(cfg, None, registry)
    controller.save(state)
    controller.enter_promoting(state)
    on_disk = StateStore(canary_paths(cfg)).read()
    assert on_disk is not None and on_disk.phase == Phase.PROMOTING
    # Once PROMOTING is on disk an abort is refused rather than silently lost.
    from services.canary import abort_canary

    with pytest.raises(CanaryError, match="being promoted"):
        abort_canary(cfg, "too late", registry)


def test_a_candidate_arriving_while_one_finishes_gets_its_own_canary(cfg) -> None:  # type: ignore[no-untyped-def]
    registry = MemoryRegistry(champion="1")
    state = start_canary(cfg, "2", registry)
    # v3 arrives, then v4; v3 may not replace the newer v4 that is waiting.
    assert start_canary(cfg, "3", registry).pending_candidate == "3"
    assert start_canary(cfg, "4", registry).pending_candidate == "4"
    with pytest.raises(CanaryError, match="older"):
        start_canary(cfg, "3", registry)

    # v2 ends (promoted) before its controller saw v4.
    store = StateStore(canary_paths(cfg))
    with store.lock():
        state = store.read()
        assert state is not None
        state.phase = Phase.PROMOTED
        store.write_locked(state)
    registry.champion = "2"

    controller = Controller(cfg, None, registry)
    assert controller.start_successor(state) is True
    successor = store.read()
    assert successor is not None
    assert (successor.candidate_version, successor.stable_version) == ("4", "2")
    assert successor.phase == Phase.STARTING and successor.steps_done == []
    archived = list(canary_paths(cfg).runs.glob("*-v2-promoted.json"))
    assert len(archived) == 1
    # Whoever waited on v2 still learns v2's outcome, not v4's.
    mine = final_state_for(cfg, "2", state.started_at)
    assert mine is not None and (mine.candidate_version, mine.phase) == ("2", Phase.PROMOTED)
    assert final_state_for(cfg, "4") is None  # still to run
    # Nothing newer is waiting now.
    assert controller.start_successor(successor) is False


def test_a_rollback_for_the_stables_missing_numbers_tags_the_candidate_inconclusive(cfg) -> None:  # type: ignore[no-untyped-def]
    registry = MemoryRegistry(champion="1")
    state = start_canary(cfg, "2", registry)
    controller = Controller(cfg, None, registry)
    with pytest.raises(_Decided):
        raise controller.decide_rollback(
            state,
            "metrics",
            "stable: /metrics unreachable",
            verdict=GateStatus.INCONCLUSIVE,
        )
    assert state.phase == Phase.ROLLED_BACK and registry.champion == "1"
    tags = registry.tags["2"]
    assert tags["gate.canary"] == "inconclusive"
    assert tags["canary.failed_guardrail"] == "metrics"
    assert registry.notes and "rolled back" in registry.notes[-1]


def test_a_state_file_with_step_dicts_loads_typed_and_is_written_back_unchanged(cfg) -> None:  # type: ignore[no-untyped-def]
    """`steps_done` is kept on disk as it always was (one JSON object per step, the result
    as `GateResult.to_dict` writes it, NaN as null) and read into typed `CanaryStep`s."""
    registry = MemoryRegistry(champion="1")
    state = start_canary(cfg, "2", registry)
    step = {
        "percent": 50,
        "candidate_version": "2",
        "started_at": 10.0,
        "ended_at": 20.0,
        "seconds": 10.0,
        "haproxy": {"stable": {"responses": 60, "5xx": 0}, "canary": {"responses": 40, "5xx": 0}},
        "result": {
            "name": "canary",
            "status": "pass",
            "reason": "step 50% passed",
            "metrics": {"step_percent": 50.0, "canary_requests": 40.0, "score_psi": None},
            "evidence": {"failed_guardrail": None},
            "checks": [
                {
                    "check": "requests per side",
                    "status": "pass",
                    "value": "40",
                    "bound": ">= 30",
                    "detail": "",
                }
            ],
        },
    }
    raw = state.to_dict()
    raw["steps_done"] = [step]
    paths = canary_paths(cfg)
    paths.state.write_text(json.dumps(raw))

    loaded = StateStore(paths).read()
    assert loaded is not None
    (typed,) = loaded.steps_done
    assert isinstance(typed, CanaryStep)
    assert (typed.percent, typed.candidate_version, typed.seconds) == (50, "2", 10.0)
    assert typed.result.status is GateStatus.PASS
    assert typed.haproxy is not None and typed.haproxy["canary"]["responses"] == 40
    assert loaded.to_dict() == raw
    StateStore(paths).save(loaded)
    assert json.loads(paths.state.read_text())["steps_done"] == [step]
