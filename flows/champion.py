"""The current champion as the flows see it: its version, the reference it was stored with,
and its scores on a holdout."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pandas as pd
from mlflow.tracking import MlflowClient

from checks.champion import ScoredModel
from checks.data_quality import DataProfile
from flows import registry
from models.config import MlgateConfig
from models.model_ref import ModelRef
from models.onnx_export import make_session, predict_proba_with_schema
from models.reference import ReferenceHistograms
from models.registry_layout import CHAMPION_ALIAS, HISTOGRAMS_ARTIFACT, PROFILE_ARTIFACT, SHA_TAG
from services.model_store import load_registered_model


@dataclass(frozen=True)
class ChampionState:
    version: str | None
    profile: DataProfile | None
    histograms: ReferenceHistograms | None = None
    sha256: str | None = None
    scored: ScoredModel | None = None
    error: str | None = None


def read_champion(client: MlflowClient, cfg: MlgateConfig) -> ChampionState:
    """The current champion and its stored reference profile. A champion that exists but
    cannot be read is reported as an error, never mistaken for 'no champion'."""
    mv = registry.get_alias_version(client, cfg.registry.model_name, CHAMPION_ALIAS)
    if mv is None:
        return ChampionState(version=None, profile=None)
    if not mv.run_id:
        return ChampionState(str(mv.version), None, error="champion version has no run")
    try:
        raw = registry.load_json_artifact(client, mv.run_id, PROFILE_ARTIFACT)
        profile = DataProfile.from_dict(raw)
    except Exception as err:
        return ChampionState(str(mv.version), None, error=f"reference profile unreadable: {err}")
    try:
        raw = registry.load_json_artifact(client, mv.run_id, HISTOGRAMS_ARTIFACT)
        histograms: ReferenceHistograms | None = ReferenceHistograms.from_dict(raw)
    except Exception:
        # Drift against the champion is evidence for the report, not a gate of training.
        histograms = None
    return ChampionState(str(mv.version), profile, histograms, mv.tags.get(SHA_TAG))


def score_champion(
    cfg: MlgateConfig, champion: ChampionState, holdout: pd.DataFrame
) -> ChampionState:
    """The champion with its scores on `holdout`; a champion that cannot be scored keeps
    the error, for the champion gate to fail on."""
    if champion.version is None or champion.error:
        return champion
    try:
        loaded = load_registered_model(
            cfg.registry.resolved_tracking_uri(),
            ModelRef(cfg.registry.model_name, version=champion.version),
        )
        session = make_session(loaded.content)
        scores = predict_proba_with_schema(session, holdout, loaded.schema)
        scored = ScoredModel(scores, version=champion.version, size_bytes=len(loaded.content))
        return dataclasses.replace(champion, scored=scored)
    except Exception as err:
        return dataclasses.replace(champion, error=f"{type(err).__name__}: {err}")
