from __future__ import annotations

from pathlib import Path

import pytest

from models.config import ConfigError, dump_config, env_override_name, load_config
from models.model_ref import ModelRef
from tests.conftest import write_config

pytestmark = pytest.mark.fast


def test_bundled_config_loads_and_is_frozen(bundled_cfg):
    assert bundled_cfg.dataset.target == "churn"
    assert bundled_cfg.dataset.path.is_absolute() and bundled_cfg.dataset.path.is_file()
    with pytest.raises(Exception, match="frozen"):
        bundled_cfg.train.seed = 1  # type: ignore[misc]


def test_unknown_field_names_field_and_file(tmp_path: Path):
    path = write_config(tmp_path, train={"estimatr": "mlp"})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "train.estimatr" in msg and "unknown field" in msg


def test_bad_value_names_field(tmp_path: Path):
    path = write_config(tmp_path, gates={"champion": {"confidence": 1.5}})
    with pytest.raises(ConfigError, match=r"gates\.champion\.confidence"):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_environment_overrides_file(tmp_path: Path, monkeypatch):
    path = write_config(tmp_path)
    monkeypatch.setenv("MLGATE_TRAIN__ESTIMATOR", "random_forest")
    monkeypatch.setenv("MLGATE_GATES__CHAMPION__FLOOR", "0.6")
    cfg = load_config(path)
    assert cfg.train.estimator == "random_forest"
    assert cfg.gates.champion.floor == 0.6
    assert cfg.gates.champion.primary_metric == "roc_auc"  # siblings survive the merge
    monkeypatch.setenv("MLGATE_TRAIN__ESTIMATOR", "xgboost")
    with pytest.raises(ConfigError, match=r"train\.estimator"):
        load_config(path)


def test_feature_listed_twice_is_refused(tmp_path: Path):
    path = write_config(tmp_path, dataset={"categorical_features": ["contract", "tenure"]})
    with pytest.raises(ConfigError, match="both numeric and categorical"):
        load_config(path)


def test_relative_paths_resolve_against_config_file(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    cfg_path = tmp_path / "sub" / "c.yaml"
    cfg_path.write_text("dataset: {path: d.csv, target: y, numeric_features: [x]}\n")
    cfg = load_config(cfg_path)
    assert cfg.dataset.path == tmp_path / "sub" / "d.csv"
    assert cfg.registry.store_dir == tmp_path / "sub" / ".mlgate"


def test_served_model_defaults_to_the_alias_and_reads_a_reference(tmp_path: Path, monkeypatch):
    cfg = load_config(write_config(tmp_path))
    assert cfg.serving.model is None
    assert cfg.served_model() == ModelRef(cfg.registry.model_name, alias=cfg.serving.alias)

    cfg = load_config(write_config(tmp_path, serving={"model": "churn/3"}))
    assert cfg.serving.model == ModelRef("churn", version="3")
    assert cfg.served_model() == ModelRef("churn", version="3")
    assert "model: churn/3" in dump_config(cfg)

    monkeypatch.setenv(env_override_name("serving", "model"), "churn@challenger")
    assert load_config(write_config(tmp_path)).served_model() == ModelRef(
        "churn", alias="challenger"
    )


def test_bad_served_model_names_the_field_and_the_problem(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"serving\.model: .*names no alias or version"):
        load_config(write_config(tmp_path, serving={"model": "churn"}))
    with pytest.raises(ConfigError, match=r"serving\.model.*positive integer, got 'v3'"):
        load_config(write_config(tmp_path, serving={"model": "churn/v3"}))
    with pytest.raises(ConfigError, match=r"names model 'other', but registry\.model_name"):
        load_config(write_config(tmp_path, serving={"model": "other@champion"}))


def test_variant_and_actor_are_config_fields_with_overrides(tmp_path: Path, monkeypatch):
    from flows.registry import current_actor

    path = write_config(tmp_path)
    cfg = load_config(path)
    assert cfg.serving.variant == "stable" and cfg.registry.actor is None
    assert "@" in current_actor(cfg.registry)
    monkeypatch.setenv(env_override_name("serving", "variant"), "canary")
    monkeypatch.setenv(env_override_name("registry", "actor"), "scheduler")
    cfg = load_config(path)
    assert (cfg.serving.variant, current_actor(cfg.registry)) == ("canary", "scheduler")
    monkeypatch.setenv("MLGATE_SERVING__VARIANT", "a b")
    with pytest.raises(ConfigError, match=r"serving\.variant"):
        load_config(path)
