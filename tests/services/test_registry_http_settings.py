"""The service's registry reads (the model fetch, the alias and shadow polls) use the
config's HTTP timeout and retries, not MLflow's minutes-long defaults: MLflow's client
reads them from its environment variables, which `open_registry_client` sets from what it
is given. A tracking server that refuses connections (a closed local port) stands in for
one that is down; nothing is mocked."""

from __future__ import annotations

import os
import socket

import pytest

from models.config import RegistryConfig
from models.model_ref import ModelRef
from services.model_store import RegistryUnavailableError, load_registered_model
from services.registry_watch import registered_model_reader

pytestmark = pytest.mark.fast

SETTINGS = RegistryConfig(http_timeout_s=7, http_max_retries=1)


@pytest.fixture
def down_server(monkeypatch: pytest.MonkeyPatch) -> str:
    # Set first so that the test's values are undone afterwards.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_the_model_fetch_passes_the_config_s_http_settings(down_server: str) -> None:
    with pytest.raises(RegistryUnavailableError):
        load_registered_model(down_server, ModelRef("churn", alias="champion"), registry=SETTINGS)
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"


def test_the_alias_poll_passes_the_config_s_http_settings(down_server: str) -> None:
    read = registered_model_reader(down_server, "churn", SETTINGS)
    with pytest.raises(Exception, match=r"127\.0\.0\.1"):
        read()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
