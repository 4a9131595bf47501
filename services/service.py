"""The prediction service: one BentoML 1.4 service class serving one registered ONNX model.

How a request travels, and why:

- `POST /predict` is a FastAPI route mounted into the service. It parses and validates the
  body itself, because BentoML answers every validation error of an `@bentoml.api` with a
  400, and clients need 400 (malformed JSON), 413 (too many rows) and 422 (a field with the
  wrong type, missing or unknown) told apart, each naming the field.
- The validated rows then go to `/score_rows`, a batchable `@bentoml.api`, through the
  service's own in-process client (`self.to_async`, an ASGI call with no socket). That hop is
  what puts them in front of BentoML's adaptive batcher, which only sits on the HTTP path of a
  batchable API: concurrent requests are scored in one ONNX Runtime call. A batch counts rows,
  so a request larger than `max_batch_size` is split and its scores joined back.

Nothing here reads files at import: the model is loaded in the service's `__init__`, in each
worker process that BentoML starts.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import bentoml
from bentoml.exceptions import BentoMLException
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from models.config import DatasetConfig, MlgateConfig

# pandas, scikit-learn (through models.train and models.onnx_export) and MLflow are imported
# where they are used, not here: BentoML's arbiter process imports this module only to read
# the service definition, and those imports would add seconds to every start.
if TYPE_CHECKING:
    import pandas as pd

    from services.model_store import LoadedModel

logger = logging.getLogger(__name__)

SERVICE_NAME = "mlgate"
SCORE_ROUTE = "/score_rows"
# A generous per-feature byte bound (key, value, punctuation) so that an oversized body is
# refused from its Content-Length, before anything parses it.
_MAX_BODY_BYTES_PER_FEATURE = 256
_MIN_BODY_BYTES = 64 * 1024
_NEVER = 2**31 - 1
_MAX_ERRORS_SHOWN = 50
_BENTOML_SKIPPED_PATHS = ["/metrics", "/healthz", "/livez", "/readyz"]


class Prediction(BaseModel):
    score: float = Field(description="probability of the positive class")
    label: int = Field(description="1 when score > 0.5, as scikit-learn's predict")


class PredictResponse(BaseModel):
    model_name: str
    model_version: str
    predictions: list[Prediction]


class ModelInfo(BaseModel):
    name: str
    version: str
    alias: str | None
    sha256: str
    providers: list[str]
    numeric_features: list[str]
    categorical_features: list[str]


def make_row_model(dataset: DatasetConfig) -> type[BaseModel]:
    """One input row: every configured feature, required, null allowed (the pipeline
    imputes numeric nulls and treats categorical nulls as a category of their own).

    Strict types, so `"3"` or `true` for a number and `3` for a category are refused rather
    than guessed; NaN and infinities are refused, a missing value is `null`."""
    fields: dict[str, Any] = {}
    for col in dataset.numeric_features:
        fields[col] = (float | None, Field(...))
    for col in dataset.categorical_features:
        fields[col] = (str | None, Field(...))
    config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)
    row: type[BaseModel] = create_model("Row", __config__=config, **fields)
    return row


def make_request_model(row_model: type[BaseModel], max_rows: int) -> type[BaseModel]:
    config = ConfigDict(extra="forbid", strict=True)
    request: type[BaseModel] = create_model(
        "PredictRequest",
        __config__=config,
        rows=(list[row_model], Field(..., min_length=1, max_length=max_rows)),  # type: ignore[valid-type]
    )
    return request


def check_model_matches_config(model: LoadedModel, dataset: DatasetConfig) -> None:
    """The request schema comes from the config and the feeds from the model's schema; a
    model trained on other columns would be fed wrong, so it is refused at start-up."""
    for kind, configured in (
        ("numeric", dataset.numeric_features),
        ("categorical", dataset.categorical_features),
    ):
        stored = model.schema.get(kind, [])
        if sorted(stored) != sorted(configured):
            raise ValueError(
                f"model {model.ref} was trained on {kind} features {sorted(stored)}, but the "
                f"config's dataset lists {sorted(configured)}; serve it with its own config"
            )


def rows_to_frame(rows: list[Any], dataset: DatasetConfig) -> pd.DataFrame:
    import pandas as pd

    columns = {c: [getattr(r, c) for r in rows] for c in dataset.features}
    return pd.DataFrame(columns, columns=list(dataset.features))


def score_rows_onnx(
    session: Any, rows: list[Any], dataset: DatasetConfig, schema: dict[str, Any]
) -> list[float]:
    """Exactly the in-process path: `prepare_features`, then the ONNX feeds, then
    `score_onnx`, so that serving cannot drift from what the parity gate checked."""
    from models.onnx_export import onnx_inputs_from_frame, score_onnx
    from models.train import prepare_features

    features = prepare_features(rows_to_frame(rows, dataset), dataset)
    scores: list[float] = score_onnx(session, onnx_inputs_from_frame(features, schema)).tolist()
    return scores


def _error_body(message: str, err: ValidationError) -> dict[str, Any]:
    errors = err.errors(include_url=False, include_context=False, include_input=False)
    shown = errors[:_MAX_ERRORS_SHOWN]
    fields = list(dict.fromkeys(".".join(str(p) for p in e["loc"]) for e in shown if e["loc"]))
    return {
        "error": f"{message}: {', '.join(fields)}" if fields else message,
        "error_count": len(errors),
        "detail": [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in shown],
    }


def classify_validation_error(err: ValidationError) -> tuple[int, dict[str, Any]]:
    """Malformed JSON is a 400, too many rows a 413, anything else about the body a 422;
    the body names each offending field as a dotted path (`rows.0.tenure`)."""
    errors = err.errors(include_url=False)
    if any(e["type"] == "json_invalid" for e in errors):
        return 400, _error_body("request body is not valid JSON", err)
    for e in errors:
        if e["type"] == "too_long" and tuple(e["loc"]) == ("rows",):
            ctx = e.get("ctx", {})
            message = (
                f"{ctx.get('actual_length', 'too many')} rows in one request, "
                f"at most {ctx.get('max_length')} allowed"
            )
            return 413, {"error": message}
    return 422, _error_body("invalid request", err)


def build_service(cfg: MlgateConfig, *, alias: str | None, version: str | None) -> Any:
    """The BentoML service class for `alias` or `version` of `cfg.registry.model_name`
    (`cfg.serving.alias` when neither is given). Returns a `bentoml.Service`."""
    if alias is not None and version is not None:
        raise ValueError("give an alias or a version to serve, not both")
    if alias is None and version is None:
        alias = cfg.serving.alias

    dataset = cfg.dataset
    serving = cfg.serving
    tracking_uri = cfg.registry.resolved_tracking_uri()
    model_name = cfg.registry.model_name
    row_model = make_row_model(dataset)
    request_model = make_request_model(row_model, serving.max_rows_per_request)
    score_input = create_model(
        "ScoreRowsInput",
        __config__=ConfigDict(extra="forbid", strict=True),
        rows=(
            list[row_model],  # type: ignore[valid-type]
            Field(..., min_length=1, max_length=serving.max_rows_per_request),
        ),
    )
    max_body_bytes = max(
        _MIN_BODY_BYTES,
        serving.max_rows_per_request * len(dataset.features) * _MAX_BODY_BYTES_PER_FEATURE,
    )
    request_schema = request_model.model_json_schema(ref_template="#/components/schemas/{model}")
    request_schema.pop("$defs", None)
    request_schema["properties"]["rows"]["items"] = row_model.model_json_schema()

    app = FastAPI(title=SERVICE_NAME, docs_url=None, redoc_url=None, openapi_url=None)

    @bentoml.service(
        name=SERVICE_NAME,
        workers=serving.workers,
        # `self.to_async` reaches our own app in-process, with no socket to recycle, and
        # BentoML 1.4.39 recycles its client session by closing it under the requests still
        # in flight (they fail with "Cannot write to closing transport"): never recycle it.
        runner_connection={"max_requests": _NEVER, "max_age": float(_NEVER)},
        # Each prediction crosses /score_rows once more; one access-log line per request.
        logging={"access": {"skip_paths": [*_BENTOML_SKIPPED_PATHS, SCORE_ROUTE]}},
    )
    @bentoml.asgi_app(app, path="/")
    class MlgateService:
        def __init__(self) -> None:
            from models.onnx_export import make_session
            from services.model_store import load_registered_model

            # BentoML leaves the root logger at WARNING; which model a worker serves, and on
            # which provider, belongs in its log.
            if logger.level == logging.NOTSET:
                logger.setLevel(logging.INFO)
            started = time.perf_counter()
            self.model = load_registered_model(
                tracking_uri, model_name, alias=alias, version=version
            )
            check_model_matches_config(self.model, dataset)
            self.session = make_session(self.model.content)
            self.providers = list(self.session.get_providers())
            logger.info(
                "serving %s, sha256 %s, on ONNX Runtime %s; loaded in %.1f s",
                self.model.ref,
                self.model.sha256,
                ", ".join(self.providers),
                time.perf_counter() - started,
            )

        @bentoml.api(
            route=SCORE_ROUTE,
            input_spec=score_input,
            batchable=serving.max_batch_size > 1,
            max_batch_size=max(2, serving.max_batch_size),
            max_latency_ms=serving.max_latency_ms,
        )
        def score_rows(self, rows: list[Any]) -> list[float]:
            """Positive-class probabilities of already validated rows (batched internally)."""
            logger.debug("scoring a batch of %d rows", len(rows))
            return score_rows_onnx(self.session, rows, dataset, self.model.schema)

        @app.post(
            "/predict",
            response_model=PredictResponse,
            openapi_extra={
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": request_schema}},
                }
            },
        )
        async def predict(self, request: Request) -> Any:
            """Score one or many rows: `{"rows": [{feature: value, ...}, ...]}`."""
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_body_bytes:
                return JSONResponse(
                    {"error": f"request body over {max_body_bytes} bytes"}, status_code=413
                )
            body = await request.body()
            if len(body) > max_body_bytes:
                return JSONResponse(
                    {"error": f"request body over {max_body_bytes} bytes"}, status_code=413
                )
            try:
                parsed = request_model.model_validate_json(body)
            except ValidationError as err:
                status, payload = classify_validation_error(err)
                return JSONResponse(payload, status_code=status)
            rows = parsed.rows  # type: ignore[attr-defined]
            try:
                scores = await self.to_async.score_rows(rows=rows)  # type: ignore[attr-defined]
            except BentoMLException as err:
                if err.error_code == 503:
                    return JSONResponse(
                        {"error": "the service is overloaded, retry shortly"},
                        status_code=503,
                        headers={"Retry-After": "1"},
                    )
                raise
            # NaN fails both comparisons; a broken score must never reach a client as data.
            if not all(0.0 <= s <= 1.0 for s in scores):
                logger.error("%s produced scores outside [0, 1]: %s", self.model.ref, scores)
                return JSONResponse(
                    {"error": "the model produced an invalid score; see the service log"},
                    status_code=500,
                )
            return JSONResponse(
                {
                    "model_name": self.model.name,
                    "model_version": self.model.version,
                    "predictions": [{"score": s, "label": int(s > 0.5)} for s in scores],
                }
            )

        @app.get("/model", response_model=ModelInfo)
        async def model_info(self) -> ModelInfo:
            return ModelInfo(
                name=self.model.name,
                version=self.model.version,
                alias=self.model.alias,
                sha256=self.model.sha256,
                providers=self.providers,
                numeric_features=list(self.model.schema["numeric"]),
                categorical_features=list(self.model.schema["categorical"]),
            )

    return MlgateService
