"""Monitoring reads the inference log where the service writes it in team mode: a filesystem
URI from the config (`serving.inference_log_uri`), not the local `.mlgate/` directory."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from flows.monitoring import read_window
from models.config import config_from_dict
from services.inference_log import InferenceLogWriter
from services.schema import RequestDecoder
from tests.conftest import BUNDLED_DATA

pytestmark = pytest.mark.integration


def test_read_window_reads_the_configured_log_uri(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    cfg = config_from_dict(
        {
            "dataset": {
                "path": str(BUNDLED_DATA),
                "target": "y",
                "numeric_features": ["tenure"],
                "categorical_features": ["contract"],
            },
            "registry": {"store_dir": str(tmp_path / "store")},
            "serving": {"inference_log_uri": shared.as_uri()},
        }
    )
    decoder = RequestDecoder(cfg.dataset, ["tenure"], ["contract"], 10)
    writer = InferenceLogWriter(
        cfg.inference_log_location(),
        model_name=cfg.registry.model_name,
        model_version="3",
        variant="stable",
        numeric=["tenure"],
        categorical=["contract"],
        max_queued_rows=100,
        flush_rows=100,
        flush_s=60.0,
    )
    writer.start()
    at = datetime(2026, 2, 3, 4, 5, tzinfo=UTC)
    for i in range(3):
        rows = decoder.decode(b'{"rows": [{"tenure": %d, "contract": "Two year"}]}' % i)
        writer.submit((at + timedelta(minutes=i)).timestamp(), f"r{i}", 1.0, rows, np.zeros(1))
    writer.close()
    assert writer.written_rows == 3

    window = read_window(cfg, at, at + timedelta(hours=1))
    assert window["request_id"].tolist() == ["r0", "r1", "r2"]
    assert window["tenure"].tolist() == [0.0, 1.0, 2.0]
    assert not (tmp_path / "store" / "inference_log").exists()
