"""The prediction service: one BentoML 1.4 service class serving one registered ONNX model.

Where the time of a request goes, and what that decided (measured on the 2-core host with
py-spy and wrk; `bench/serving.py` and bench/RESULTS.md have the numbers):

- BentoML's `@bentoml.api` path (its IO descriptors, its runner client, its dispatcher) is
  most of the cost of a small request, so `/predict` is a route of an ASGI app mounted with
  `@bentoml.asgi_app`: a plain ASGI endpoint (`services.app`) on a middleware-free Starlette
  app (`BareRoutes`) mounted ahead of the FastAPI app, which serves `/model` and documents
  `/predict` for /docs.json.
- BentoML's middlewares run for every request of the worker. Its OpenTelemetry middleware
  costs more than half of the remaining path when the URL is traced; the hot paths are
  excluded from tracing unless `serving.trace_requests`. Its metrics middleware and access
  log are off: `/metrics` is ours (`services.metrics`), and every prediction is in the
  inference log. Its timeout middleware leaks a timer per request, which made full garbage
  collections stall the worker; `services.bentoml_fixes` cancels it.
- Adaptive batching is `services.batcher.AdaptiveBatcher`, in the worker's event loop; see
  there why not BentoML's batcher (a second trip through the request path, and a deadline
  that turns load into 503s).
- Garbage collection: the start-up heap is frozen and the young generation collected less
  often (`services.app.freeze_heap`); the inference log holds Arrow tables, not Python rows.

Readiness: `/readyz` answers 200 only once the model is loaded, verified (sha256), checked
against the config's features and has passed a warm-up through the serving path; its body
names the model and where it came from. A model that passed all of that is kept as the
last-known-good copy (`services.model_store`); when the registry cannot be reached at
start-up, that copy is served instead, and `/readyz`, `/model` and the
`mlgate_model_from_last_known_good` gauge say so.
Exposure: `/metrics`, `/model`, `/docs.json` and the API page answer as
`serving.internal_endpoints` says (`services.exposure`); connections slow to send their
headers, or idle, are cut (`services.slow_clients`).
Shutdown: SIGTERM makes the worker stop accepting, finish the requests in flight, answer
what the batcher holds, and write the inference log's queue before it exits.

Nothing here reads files at import: the model is loaded in the service's `__init__`, in each
worker process that BentoML starts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import bentoml
from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from models.config import DatasetConfig, MlgateConfig
from models.model_ref import ModelRef
from services.alias_watch import AliasWatch
from services.alias_watch import logger as alias_logger
from services.app import MetricsEndpoint, PredictEndpoint, freeze_heap
from services.bentoml_fixes import cancel_timeout_timers
from services.exposure import ExposureGuard
from services.registry_watch import registered_model_reader
from services.schema import ErrorBody, ModelInfo, PredictResponse, request_openapi_schema
from services.shadow import ShadowScorer, ShadowWatch
from services.slow_clients import cut_slow_clients

# pandas, scikit-learn, pyarrow, onnxruntime and MLflow are imported where they are used, not
# here: BentoML's arbiter process imports this module only to read the service definition,
# and those imports would add seconds to every start.
if TYPE_CHECKING:
    from services.app import ModelRuntime
    from services.inference_log import InferenceLogWriter
    from services.model_store import LoadedModel

logger = logging.getLogger(__name__)

SERVICE_NAME = "mlgate"
_HOT_PATHS = ["/predict", "/metrics", "/livez", "/readyz", "/healthz"]
_CATEGORY_ATTRIBUTES = ("cats_strings", "keys_strings")
# Applied to the class BentoML builds its middleware stack from, before any worker starts.
cancel_timeout_timers()

_PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "the body is not valid JSON, or not UTF-8"},
    401: {"model": ErrorBody, "description": "no `Authorization: Bearer <API key>` header"},
    403: {"model": ErrorBody, "description": "the API key is unknown or revoked"},
    413: {"model": ErrorBody, "description": "too many rows, or the body is too large"},
    415: {
        "model": ErrorBody,
        "description": "the body is not sent as JSON in UTF-8, or is compressed",
    },
    422: {
        "model": ErrorBody,
        "description": (
            "a field is missing, unknown, given twice, of the wrong type, NaN, out of range, "
            "or a category longer than the bound"
        ),
    },
    429: {"model": ErrorBody, "description": "the key's rate limit; see Retry-After"},
    503: {"model": ErrorBody, "description": "not ready yet, or overloaded; see Retry-After"},
}


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


def check_categories_fit(content: bytes, max_chars: int) -> None:
    """Every category the model knows (its ONNX one-hot encoders' `cats_strings`, label
    encoders' `keys_strings`) must fit `serving.max_category_chars`: a smaller bound would
    refuse every request that sends it, so such a model is refused at start-up instead."""
    import onnx

    for node in onnx.load_model_from_string(content).graph.node:
        for attr in node.attribute:
            if attr.name not in _CATEGORY_ATTRIBUTES:
                continue
            for raw in attr.strings:
                label = raw.decode("utf-8", errors="replace")
                if len(label) > max_chars:
                    feature = node.input[0] if node.input else node.name
                    raise ValueError(
                        f"the model knows a {feature!r} category of {len(label)} characters "
                        f"({label[:40]!r}...), longer than serving.max_category_chars "
                        f"({max_chars}); raise the bound to serve it"
                    )


def describe_providers(content: bytes, providers: list[str]) -> str:
    """Which execution provider the model got, and why a tree ensemble is on CPU anyway."""
    import onnx

    ops = {node.op_type for node in onnx.load_model_from_string(content).graph.node}
    trees = sorted(op for op in ops if op.startswith("TreeEnsemble"))
    if "CUDAExecutionProvider" in providers and trees:
        return (
            f"{', '.join(providers)} (its {', '.join(trees)} nodes have no CUDA kernel in "
            "ONNX Runtime and run on CPU)"
        )
    if "CUDAExecutionProvider" not in providers:
        return f"{', '.join(providers)} (no GPU here, or none requested)"
    return ", ".join(providers)


class BareRoutes(Starlette):
    """A Starlette app without Starlette's error and exception middlewares (its endpoints
    answer their own errors): the hot paths, mounted ahead of the FastAPI app. BentoML
    routes a request to a mounted Starlette app only when one of its routes matches."""

    def build_middleware_stack(self) -> ASGIApp:
        return self.router


def describe_source(model: LoadedModel) -> dict[str, Any]:
    """Where the served model came from, as `/readyz` and `/model` tell it: the registry,
    or the last-known-good copy (when the registry gave it, and why it was not asked)."""
    fallback = model.last_known_good
    if fallback is None:
        return {"source": "registry", "last_known_good": None}
    return {
        "source": "last_known_good",
        "last_known_good": {"fetched_at": fallback.fetched_at, "reason": fallback.reason},
    }


class ReadinessAnswer:
    """`GET /readyz` once the model serves: 200 with the model and where it came from.
    Before that, BentoML's own answer (503). BentoML matches its `/readyz` route ahead of
    every mounted app, so only a middleware can answer it; other requests pay one string
    comparison here."""

    def __init__(self, app: ASGIApp, predict: PredictEndpoint) -> None:
        self.app = app
        self.predict = predict

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime = self.predict.runtime
        if scope.get("path") != "/readyz" or runtime is None or not runtime.ready:
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            {"ready": True, "model": runtime.model.ref, **describe_source(runtime.model)}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(body)),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _document_route(app: FastAPI, served_by: Any, **route: Any) -> APIRoute:
    """An APIRoute that only documents a path (FastAPI builds its OpenAPI entry from the
    route's models and extras; BentoML reads them into /docs.json). `served_by`, mounted
    ahead of this app, answers every request to the path, so this one never runs."""

    async def documentation_only(request: Request) -> None:
        raise RuntimeError(f"{request.url.path} is served by {type(served_by).__name__}")

    documentation_only.__doc__ = route.pop("description", None)
    app.add_api_route(endpoint=documentation_only, **route)
    added = app.router.routes[-1]
    assert isinstance(added, APIRoute)
    # Were it ever reached (mounting order changed), the request still gets the real answer.
    added.app = served_by
    return added


def inference_log_writer(
    serving: Any, log_dir: Any, model: Any, variant: str, **callbacks: Any
) -> InferenceLogWriter:
    """The inference log writer of `model`'s rows as `variant`, sized by `serving`."""
    from services.inference_log import InferenceLogWriter

    return InferenceLogWriter(
        log_dir,
        model_name=model.name,
        model_version=model.version,
        variant=variant,
        numeric=model.schema["numeric"],
        categorical=model.schema["categorical"],
        max_queued_rows=serving.inference_log_max_queued_rows,
        flush_rows=serving.inference_log_flush_rows,
        flush_s=serving.inference_log_flush_s,
        **callbacks,
    )


def shadow_watch(
    cfg: MlgateConfig,
    tracking_uri: str,
    predict: PredictEndpoint,
    log_dir: Any,
    swap_lock: threading.Lock,
) -> ShadowWatch:
    """The watch that keeps the served runtime's `shadow` on the version the registry names
    (services/shadow.py); started once the worker serves. `swap_lock` keeps it from
    setting the shadow of a runtime the alias watch is swapping out."""
    from models.onnx_export import make_session, onnx_inputs_from_columns, score_onnx
    from models.registry_layout import SHADOW_TAG, SHADOW_VARIANT
    from services.model_store import load_registered_model

    assert predict.runtime is not None
    serving = cfg.serving
    read_model = registered_model_reader(tracking_uri, predict.runtime.model.name, cfg.registry)

    def read_tag() -> str | None:
        return read_model().tags.get(SHADOW_TAG) or None

    def make_scorer(version: str) -> ShadowScorer:
        assert predict.runtime is not None
        served = predict.runtime.model
        if version == served.version:
            raise ValueError(f"v{version} is the version this instance serves")
        shadow = load_registered_model(
            tracking_uri, ModelRef(served.name, version=version), registry=cfg.registry
        )
        for kind in ("numeric", "categorical"):
            if list(shadow.schema[kind]) != list(served.schema[kind]):
                raise ValueError(
                    f"its {kind} features {shadow.schema[kind]} differ from the served "
                    f"model's {served.schema[kind]}"
                )
        session = make_session(shadow.content, prefer_gpu=False)

        def score(rows: Any) -> Any:
            feeds = onnx_inputs_from_columns(rows.numeric, rows.labels, shadow.schema)
            return score_onnx(session, feeds)

        writer = inference_log_writer(serving, log_dir, shadow, SHADOW_VARIANT)
        return ShadowScorer(shadow, score, writer, serving.shadow_queue_rows)

    def on_change(scorer: ShadowScorer | None) -> None:
        with swap_lock:
            assert predict.runtime is not None
            predict.runtime.shadow = scorer

    return ShadowWatch(read_tag, make_scorer, on_change, serving.shadow_poll_s)


def open_session(model: LoadedModel, cfg: MlgateConfig) -> tuple[Any, Any, Any]:
    """The checks a model passes before it serves (its features, its categories), then its
    ONNX Runtime session: (session, encoder, graph choice), as `models.tree_graph` opens
    them."""
    from models.tree_graph import open_serving_session

    check_model_matches_config(model, cfg.dataset)
    check_categories_fit(model.content, cfg.serving.max_category_chars)
    return open_serving_session(model.content, model.gpu_content)


def open_runtime(
    model: LoadedModel,
    opened: tuple[Any, Any, Any],
    cfg: MlgateConfig,
    *,
    authenticator: Any,
    metrics: Any,
    log_dir: Any,
) -> ModelRuntime:
    """The worker's runtime of `model` on its `opened` session, with an inference log writer
    of its own (not started) and the worker's authenticator and metrics; not warmed up."""
    from models.tree_graph import GPU_BATCH_ROWS
    from services.app import ModelRuntime

    session, encode, graph = opened
    serving = cfg.serving
    log_writer = inference_log_writer(
        serving,
        log_dir,
        model,
        serving.variant,
        # Through the metrics object, so that rows are counted under the version it labels.
        on_written=lambda rows: metrics.log_written(rows),
        on_dropped=lambda rows: metrics.log_dropped(rows),
    )
    return ModelRuntime(
        model,
        session,
        cfg.dataset,
        serving,
        variant=serving.variant,
        authenticator=authenticator,
        log_writer=log_writer,
        metrics=metrics,
        encode=encode,
        graph=graph.graph,
        # A GPU pays for itself on large calls: 16,384 rows, not the CPU's batch.
        max_batch_rows=max(serving.max_batch_size, GPU_BATCH_ROWS)
        if graph.graph == "gpu"
        else None,
    )


def alias_watch(
    cfg: MlgateConfig,
    ref: ModelRef,
    tracking_uri: str,
    predict: PredictEndpoint,
    opened_runtime: Callable[[LoadedModel], ModelRuntime],
    swap: Callable[[ModelRuntime], None],
) -> AliasWatch[ModelRuntime]:
    """The watch that keeps the worker on the version `ref`'s alias names
    (services/alias_watch.py): a version is fetched and verified as at start-up, opened by
    `opened_runtime` and warmed up, then handed to `swap`; the copy kept as last-known-good
    follows."""
    from services.model_store import load_registered_model, save_last_known_good

    assert ref.alias is not None
    alias = ref.alias
    read_model = registered_model_reader(tracking_uri, ref.name, cfg.registry)
    last_known_good_dir = cfg.registry.last_known_good_dir()

    def read_version() -> str | None:
        version = (read_model().aliases or {}).get(alias)
        return None if version is None else str(version)

    def served() -> tuple[str, bool]:
        assert predict.runtime is not None
        model = predict.runtime.model
        return model.version, model.last_known_good is not None

    def prepare(version: str) -> ModelRuntime:
        # By alias, so that the model keeps its alias (`/model`, the last-known-good slot);
        # the alias may have moved again since it was read: the newest version wins.
        model = load_registered_model(tracking_uri, ref, registry=cfg.registry)
        runtime = opened_runtime(model)
        runtime.warm_up()
        return runtime

    def install(runtime: ModelRuntime) -> None:
        swap(runtime)
        try:
            save_last_known_good(runtime.model, last_known_good_dir, tracking_uri)
        except OSError as err:
            logger.warning(
                "could not keep %s as the last-known-good copy in %s: %s",
                runtime.model.ref,
                last_known_good_dir,
                err,
            )

    def counted(done: bool) -> None:
        assert predict.runtime is not None
        predict.runtime.metrics.count_swap(done)

    return AliasWatch(
        alias, read_version, served, prepare, install, counted, cfg.serving.alias_poll_s
    )


async def retire_runtime(runtime: ModelRuntime, timeout_s: float) -> None:
    """Close a runtime swapped out: once the requests inside it are answered (at most
    `timeout_s`, the request timeout), its batcher, then its inference log writer (off the
    event loop: it writes its last rows)."""
    deadline = time.monotonic() + timeout_s
    while runtime.in_flight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await runtime.batcher.close()
    if runtime.log_writer is not None:
        await asyncio.to_thread(runtime.log_writer.close)


def build_service(cfg: MlgateConfig, ref: ModelRef) -> Any:
    """The BentoML service class for the model `ref` (`cfg.served_model()` as a rule).
    Returns a `bentoml.Service`."""
    dataset = cfg.dataset
    serving = cfg.serving
    tracking_uri = cfg.registry.resolved_tracking_uri()
    last_known_good_dir = cfg.registry.last_known_good_dir()
    retry_s = cfg.registry.unavailable_retry_s
    log_dir = cfg.inference_log_location()

    cut_slow_clients(serving.header_timeout_s, serving.keep_alive_s)
    predict_endpoint = PredictEndpoint()
    metrics_endpoint = MetricsEndpoint()
    hot = BareRoutes(
        routes=[
            Route("/predict", predict_endpoint, methods=["POST"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
        ]
    )
    app = FastAPI(title=SERVICE_NAME, docs_url=None, redoc_url=None, openapi_url=None)
    _document_route(
        app,
        predict_endpoint,
        path="/predict",
        methods=["POST"],
        response_model=PredictResponse,
        responses=_PREDICT_RESPONSES,
        summary="Score one or many rows",
        description=(
            'Score rows: `{"rows": [{feature: value, ...}, ...]}`; the response holds one '
            "prediction per row, in order. Every feature is required (`null` when missing)."
        ),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": request_openapi_schema(
                            dataset, serving.max_rows_per_request, serving.max_category_chars
                        )
                    }
                },
            }
        },
    )
    service_config: dict[str, Any] = {
        "name": SERVICE_NAME,
        "workers": serving.workers,
        "traffic": {"timeout": serving.request_timeout_s},
        "metrics": {"enabled": False},
        "logging": {"access": {"enabled": serving.access_log, "skip_paths": _HOT_PATHS[1:]}},
    }
    if not serving.trace_requests:
        service_config["tracing"] = {"excluded_urls": _HOT_PATHS}
    if serving.gpus:
        service_config["resources"] = {"gpu": serving.gpus}

    # Decorators apply bottom up: `hot` is mounted first, so it is matched first.
    @bentoml.service(**service_config)
    @bentoml.asgi_app(app, path="/", name="api")
    @bentoml.asgi_app(hot, path="/", name="hot")
    class MlgateService:
        def __init__(self) -> None:
            from services.auth import (
                API_KEYS_ENV,
                ApiKey,
                Authenticator,
                merge_api_keys,
                parse_api_keys_env,
            )
            from services.metrics import ServiceMetrics
            from services.model_store import load_served_model, save_last_known_good

            # BentoML leaves the root logger at WARNING; which model a worker serves, and on
            # which provider, belongs in its log.
            for named in (logger, alias_logger):
                if named.level == logging.NOTSET:
                    named.setLevel(logging.INFO)
            started = time.perf_counter()
            variant = serving.variant
            model = load_served_model(
                tracking_uri,
                ref,
                last_known_good_dir=last_known_good_dir,
                retry_s=retry_s,
                registry=cfg.registry,
            )
            if model.last_known_good is not None:
                logger.warning(
                    "%s; serving the last-known-good copy of %s, sha256 %s, which the registry "
                    "gave at %s (%s)",
                    model.last_known_good.reason,
                    model.ref,
                    model.sha256,
                    model.last_known_good.fetched_at,
                    model.last_known_good.path,
                )
            opened = open_session(model, cfg)
            session, _, graph = opened
            providers = list(session.get_providers())
            authenticator = Authenticator(
                merge_api_keys(
                    (
                        ApiKey(k.name, k.sha256, k.revoked, k.rate_limit_per_s, k.rate_limit_burst)
                        for k in serving.api_keys
                    ),
                    parse_api_keys_env(os.environ.get(API_KEYS_ENV)),
                ),
                rate_per_s=serving.rate_limit_per_s,
                burst=serving.rate_limit_burst,
                failed_auth_per_s=serving.failed_auth_per_s,
                failed_auth_burst=serving.failed_auth_burst,
            )
            metrics = ServiceMetrics(
                model.name,
                model.version,
                variant,
                providers[0],
                model.sha256,
                from_last_known_good=model.last_known_good is not None,
                graph=graph.graph,
                gpus=serving.gpus / serving.workers,
            )

            def opened_runtime(model: LoadedModel, opened: Any = None) -> ModelRuntime:
                return open_runtime(
                    model,
                    opened or open_session(model, cfg),
                    cfg,
                    authenticator=authenticator,
                    metrics=metrics,
                    log_dir=log_dir,
                )

            self.runtime: ModelRuntime = opened_runtime(model, opened)
            log_writer = self.runtime.log_writer
            assert log_writer is not None
            self.runtime.warm_up()
            if model.last_known_good is None:
                # Only a model that passed every start-up check becomes the copy for an outage.
                try:
                    save_last_known_good(model, last_known_good_dir, tracking_uri)
                except OSError as err:
                    logger.warning(
                        "could not keep %s as the last-known-good copy in %s: %s",
                        model.ref,
                        last_known_good_dir,
                        err,
                    )
            log_writer.start()
            predict_endpoint.runtime = self.runtime
            self.swap_lock = threading.Lock()
            self.retiring: set[asyncio.Task[None]] = set()
            self.shadow_watch = (
                None
                if variant == "canary"
                else shadow_watch(cfg, tracking_uri, predict_endpoint, log_dir, self.swap_lock)
            )
            # Pinned to a version: nothing to follow.
            self.alias_watch = (
                alias_watch(cfg, ref, tracking_uri, predict_endpoint, opened_runtime, self.swap)
                if ref.alias is not None and serving.alias_poll_s > 0
                else None
            )
            metrics_endpoint.metrics = metrics
            logger.info(
                "serving %s (variant %s), sha256 %s, %s graph on ONNX Runtime %s (%s); loaded "
                "and warmed up in %.1f s",
                model.ref,
                variant,
                model.sha256,
                graph.graph.upper(),
                describe_providers(
                    (model.gpu_content if graph.graph == "gpu" else None) or model.content,
                    providers,
                ),
                graph.reason,
                time.perf_counter() - started,
            )
            logger.info("%s", authenticator.describe())
            logger.info(
                "adaptive batching: up to %d rows per ONNX Runtime call; inference log in %s",
                self.runtime.batcher.max_batch_rows,
                log_writer.location,
            )
            if self.alias_watch is not None:
                logger.info(
                    "following @%s: the registry is asked every %g s which version it names",
                    ref.alias,
                    serving.alias_poll_s,
                )

        def swap(self, runtime: ModelRuntime) -> None:
            """Serve `runtime` (loaded, verified, warmed up) instead of the current one; from
            the alias watch's thread, returns once the swap is done on the event loop."""
            asyncio.run_coroutine_threadsafe(self.install(runtime), self.loop).result(timeout=60)

        async def install(self, new: ModelRuntime) -> None:
            # One event loop step: every request that starts after it runs on `new`; the
            # ones already inside `old` finish there, and `old` closes after them.
            old = self.runtime
            with self.swap_lock:
                new.shadow = old.shadow
                old.metrics.switch_model(
                    new.model.version,
                    new.providers[0],
                    new.model.sha256,
                    from_last_known_good=new.model.last_known_good is not None,
                    graph=new.graph,
                )
                if new.log_writer is not None:
                    new.log_writer.start()
                old.ready = False
                new.mark_ready()
                predict_endpoint.runtime = new
                self.runtime = new
            task = asyncio.create_task(retire_runtime(old, serving.request_timeout_s))
            self.retiring.add(task)
            task.add_done_callback(self.retiring.discard)

        @bentoml.on_startup
        async def freeze_startup_heap(self) -> None:
            frozen = freeze_heap()
            self.runtime.mark_ready()
            self.loop = asyncio.get_running_loop()
            if self.shadow_watch is not None:
                self.shadow_watch.start()
            if self.alias_watch is not None:
                self.alias_watch.start()
            logger.info("ready; %d start-up objects frozen out of garbage collection", frozen)

        @bentoml.on_shutdown
        async def drain(self) -> None:
            # By now uvicorn has finished the requests in flight; answer what is queued and
            # write the inference log's last rows.
            if self.alias_watch is not None:
                await asyncio.to_thread(self.alias_watch.stop)
            if self.retiring:
                await asyncio.wait(self.retiring, timeout=60)
            await asyncio.wait_for(self.runtime.close(), timeout=60)
            if self.shadow_watch is not None:
                await asyncio.to_thread(self.shadow_watch.stop)
            writer = self.runtime.log_writer
            if writer is not None:
                logger.info(
                    "stopped: %d inference log rows written, %d dropped",
                    writer.written_rows,
                    writer.dropped_rows,
                )

        async def __is_ready__(self) -> bool:
            return self.runtime.ready

        @app.get("/model", response_model=ModelInfo)
        async def model_info(self) -> ModelInfo:
            model = self.runtime.model
            return ModelInfo(
                name=model.name,
                version=model.version,
                alias=model.alias,
                sha256=model.sha256,
                variant=self.runtime.variant,
                providers=self.runtime.providers,
                graph="gpu" if self.runtime.graph == "gpu" else "cpu",
                numeric_features=list(model.schema["numeric"]),
                categorical_features=list(model.schema["categorical"]),
                shadow=None if self.runtime.shadow is None else self.runtime.shadow.stats(),
                **describe_source(model),
            )

    # `bentoml.service` has made the class a `bentoml.Service`, which mypy cannot see.
    service: Any = MlgateService
    service.add_asgi_middleware(ReadinessAnswer, predict=predict_endpoint)
    service.add_asgi_middleware(ExposureGuard, predict=predict_endpoint, serving=serving)
    return service
