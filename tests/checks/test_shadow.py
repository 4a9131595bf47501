"""The shadow verdict, without a server: pairing the inference log's two sides, labels
joined by request id, and the verdicts (too few pairs or labels never pass; a worse shadow
fails on live labels; a slow one fails its latency bound when one is set)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from checks.result import GateStatus
from checks.shadow import attach_labels, judge_shadow, pair_rows
from models.config import ChampionGateConfig, ShadowGateConfig

pytestmark = pytest.mark.fast

CHAMPION = ChampionGateConfig(bootstrap_resamples=200)


def log_of(requests: list[int], champion: np.ndarray, shadow: np.ndarray) -> pd.DataFrame:
    """An inference log: request i has requests[i] rows; both sides, shadow rows later."""
    ids = np.repeat([f"r{i}" for i in range(len(requests))], requests)
    ts = pd.Timestamp("2026-12-05", tz="UTC")
    side = lambda version, variant, scores, ms: pd.DataFrame(  # noqa: E731
        {
            "ts": ts,
            "request_id": ids,
            "model_version": version,
            "variant": variant,
            "latency_ms": ms,
            "score": scores,
        }
    )
    return pd.concat(
        [side("3", "shadow", shadow, 2.0), side("2", "stable", champion, 5.0)],
        ignore_index=True,
    )


def test_pairs_match_request_and_row_and_ignore_other_versions() -> None:
    champion = np.array([0.1, 0.2, 0.3, 0.4])
    shadow = np.array([0.15, 0.25, 0.35, 0.45])
    log = log_of([1, 3], champion, shadow)
    # A canary's rows and a shadow row of another version are not pairs.
    extra = log.iloc[:1].assign(model_version="9", variant="canary")
    pairs = pair_rows(pd.concat([log, extra]), "2", "3")
    assert list(pairs["request_id"]) == ["r0", "r1", "r1", "r1"]
    assert list(pairs["row"]) == [0, 0, 1, 2]
    np.testing.assert_allclose(pairs["champion_score"], champion)
    np.testing.assert_allclose(pairs["shadow_score"], shadow)
    assert pair_rows(log.iloc[:0], "2", "3").empty


def test_labels_join_on_request_id_and_row_and_say_what_they_lack() -> None:
    pairs = pair_rows(
        log_of([1, 2], np.array([0.1, 0.2, 0.3]), np.array([0.1, 0.2, 0.3])), "2", "3"
    )
    labels = pd.DataFrame({"request_id": ["r1", "r0"], "row": [1, 0], "churned": ["Yes", "No"]})
    joined = attach_labels(pairs, labels, "churned")
    assert sorted(zip(joined["request_id"], joined["row"], joined["y"], strict=True)) == [
        ("r0", 0, "No"),
        ("r1", 1, "Yes"),
    ]
    with pytest.raises(ValueError, match="request_id"):
        attach_labels(pairs, labels.drop(columns="request_id"), "churned")


def labelled(n: int, shadow_noise: float, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    champion = np.clip(0.5 + (y - 0.5) * 0.6 + rng.normal(0, 0.15, n), 0, 1)
    shadow = np.clip(
        0.5 + (y - 0.5) * 0.6 * (1 - shadow_noise) + rng.normal(0, 0.15 + shadow_noise, n), 0, 1
    )
    pairs = pair_rows(log_of([1] * n, champion, shadow), "2", "3")
    return pairs, pairs.assign(y=y)


def judge(pairs: pd.DataFrame, with_labels: pd.DataFrame | None, **cfg: float) -> GateStatus:
    return judge_shadow(
        pairs,
        with_labels,
        ShadowGateConfig(**cfg),
        CHAMPION,
        champion_version="2",
        shadow_version="3",
    ).status


def test_too_few_pairs_or_labels_is_inconclusive_never_a_pass() -> None:
    pairs, with_y = labelled(300, 0.0)
    assert judge(pairs, None, min_pairs=100) is GateStatus.INCONCLUSIVE
    assert judge(pairs, with_y.head(50), min_pairs=100, min_labelled=100) is (
        GateStatus.INCONCLUSIVE
    )
    assert judge(pairs.head(50), with_y, min_pairs=100, min_labelled=100) is (
        GateStatus.INCONCLUSIVE
    )
    assert judge(pairs, with_y, min_pairs=100, min_labelled=100) is GateStatus.PASS


def test_a_worse_shadow_fails_on_live_labels_with_the_interval_in_the_result() -> None:
    pairs, with_y = labelled(1500, 0.8)
    result = judge_shadow(
        pairs,
        with_y,
        ShadowGateConfig(min_pairs=100, min_labelled=100),
        CHAMPION,
        champion_version="2",
        shadow_version="3",
    )
    assert result.status is GateStatus.FAIL
    assert result.metrics["ci_high"] < 0 and "regression" in result.reason
    assert 0 < result.metrics["agreement"] < 1 and result.metrics["score_psi"] > 0


def test_latency_is_reported_and_judged_only_with_a_bound() -> None:
    pairs, with_y = labelled(300, 0.0)
    slow = pairs.assign(shadow_latency_ms=50.0)
    assert judge(slow, with_y, min_pairs=100, min_labelled=100) is GateStatus.PASS
    assert judge(slow, with_y, min_pairs=100, min_labelled=100, max_p99_ratio=2.0) is (
        GateStatus.FAIL
    )
