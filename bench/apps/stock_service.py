"""A stock BentoML service with default settings whose `@bentoml.api` calls the
scikit-learn pipeline saved at `BENCH_PIPELINE`
(`bentoml serve bench.apps.stock_service:StockService`)."""

import os

import bentoml
import joblib
import pandas as pd


@bentoml.service
class StockService:
    def __init__(self) -> None:
        self.pipeline = joblib.load(os.environ["BENCH_PIPELINE"])

    @bentoml.api
    def predict(self, rows: list[dict]) -> list[float]:
        return self.pipeline.predict_proba(pd.DataFrame(rows))[:, 1].tolist()
