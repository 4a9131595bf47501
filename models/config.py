"""The one config object: `mlgate.yaml` validated into frozen pydantic models.

Environment variables with the `MLGATE_` prefix override the file, nested fields joined by
a double underscore (`MLGATE_REGISTRY__MODEL_NAME=churn2`); `env_override_name` spells them.
The file's own location is not a field (it cannot be in the file): `MLGATE_CONFIG` tells the
service's `bentoml serve` child where it is (`services/bento_service.py`).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from models.model_ref import ModelRef
from models.registry_layout import CHAMPION_ALIAS, TRAINING_EXPERIMENT

DEFAULT_CONFIG_PATH = Path("mlgate.yaml")
ENV_PREFIX = "MLGATE_"
ENV_NESTED_DELIMITER = "__"
# Not a field (the file's location cannot be in the file): where the service's `bentoml
# serve` child finds it. Set by services/launcher.py, read only by services/bento_service.py.
CONFIG_PATH_ENV = "MLGATE_CONFIG"

Estimator = Literal["logistic_regression", "gradient_boosting", "random_forest", "mlp"]
PrimaryMetric = Literal["roc_auc", "pr_auc", "f1", "neg_log_loss", "neg_brier"]
# A category is a label, not free text: services/schema.py bounds requests by this default.
DEFAULT_MAX_CATEGORY_CHARS = 256
# Schemes `pyarrow.fs.FileSystem.from_uri` opens (services/inference_log.py opens the URI).
INFERENCE_LOG_URI_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(_Section):
    path: Path
    target: str
    positive_label: str | int | bool = 1
    id_column: str | None = None
    numeric_features: tuple[str, ...] = ()
    categorical_features: tuple[str, ...] = ()
    slice_columns: tuple[str, ...] = ()
    timestamp_column: str | None = None

    @property
    def features(self) -> tuple[str, ...]:
        return self.numeric_features + self.categorical_features

    @model_validator(mode="after")
    def _check_columns(self) -> DatasetConfig:
        if not self.features:
            raise ValueError("at least one numeric or categorical feature is required")
        overlap = set(self.numeric_features) & set(self.categorical_features)
        if overlap:
            raise ValueError(f"columns listed as both numeric and categorical: {sorted(overlap)}")
        if self.target in self.features:
            raise ValueError(f"target {self.target!r} is also listed as a feature")
        if self.id_column is not None and self.id_column in self.features:
            raise ValueError(f"id column {self.id_column!r} is also listed as a feature")
        return self


class CandidateConfig(_Section):
    """One configuration the training flow tries (`train.candidates`)."""

    estimator: Estimator
    params: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(_Section):
    """The model and its split. With `candidates`, those configurations are trained instead
    of `estimator`/`params` and the best on a seeded, stratified `selection_size` share of
    the training part (never the holdout) is refit on the whole training part."""

    estimator: Estimator = "gradient_boosting"
    params: dict[str, Any] = Field(default_factory=dict)
    test_size: float = Field(default=0.25, gt=0.0, lt=1.0)
    seed: int = 42
    candidates: tuple[CandidateConfig, ...] = ()
    selection_size: float = Field(default=0.2, gt=0.0, lt=1.0)


class DataGateConfig(_Section):
    min_rows: int = Field(default=100, ge=1)
    max_rows: int | None = None
    max_null_share: float = Field(default=0.05, ge=0.0, le=1.0)
    null_share_tolerance: float = Field(default=0.02, ge=0.0, le=1.0)
    range_tolerance: float = Field(default=0.1, ge=0.0)
    min_category_share_known: float = Field(default=0.99, ge=0.0, le=1.0)
    max_staleness_days: float | None = None


class ChampionGateConfig(_Section):
    primary_metric: PrimaryMetric = "roc_auc"
    floor: float = 0.7
    max_regression: float = Field(default=0.01, ge=0.0)
    bootstrap_resamples: int = Field(default=1000, ge=100)
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
    seed: int = 7
    min_slice_rows: int = Field(default=100, ge=1)
    max_slice_regression: float = Field(default=0.05, ge=0.0)
    slice_floor: float | None = None
    max_brier: float | None = 0.25
    max_latency_us_per_row: float | None = 5000.0
    max_model_mb: float | None = 200.0


class ParityGateConfig(_Section):
    tolerance: float = Field(default=1e-4, gt=0.0)


class BehaviourGateConfig(_Section):
    """Behavioural checks run on the holdout for every challenger (`checks/behaviour.py`):
    none declared, the gate passes saying so. A row's predicted label is its score at or
    above `threshold`; the evidence keeps the first `max_failing_rows` rows of each check
    that broke its expectation."""

    class Invariance(_Section):
        """Changing `column` must move no holdout row's score by more than `epsilon`: each
        of `values` set on every row, or the column shuffled across rows (`perturbation`)."""

        column: str = Field(min_length=1)
        values: tuple[bool | int | float | str, ...] = ()
        perturbation: Literal["shuffle"] | None = None
        epsilon: float = Field(default=0.0, ge=0.0)

        @model_validator(mode="after")
        def _one_change(self) -> BehaviourGateConfig.Invariance:
            if bool(self.values) == (self.perturbation is not None):
                raise ValueError("give either values (a non-empty list) or perturbation: shuffle")
            return self

    class Directional(_Section):
        """Adding `delta` to the numeric `column` of every holdout row may move its score
        only in `direction`; a move the other way by more than `tolerance` breaks it."""

        column: str = Field(min_length=1)
        delta: float
        direction: Literal["non_increasing", "non_decreasing"]
        tolerance: float = Field(default=0.0, ge=0.0)

        @field_validator("delta")
        @classmethod
        def _check_delta(cls, delta: float) -> float:
            if delta == 0 or delta != delta or abs(delta) == float("inf"):
                raise ValueError("delta must be a finite number other than 0")
            return delta

    class SliceGap(_Section):
        """The largest gap in `metric` between the slices of `column` that hold at least
        `min_rows` rows of the metric's denominator (positives for recall, negatives for
        fpr) may widen against the champion's on the same holdout by at most
        `max_widening`, and, when set, may not exceed `max_gap` (the only bound with no
        champion yet)."""

        column: str = Field(min_length=1)
        metric: Literal["recall", "fpr"]
        max_widening: float = Field(ge=0.0, le=1.0)
        min_rows: int = Field(default=30, ge=1)
        max_gap: float | None = Field(default=None, ge=0.0, le=1.0)

    threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    max_failing_rows: int = Field(default=20, ge=0)
    seed: int = 0
    invariance: tuple[Invariance, ...] = ()
    directional: tuple[Directional, ...] = ()
    slice_gap: tuple[SliceGap, ...] = ()

    def column_problems(self, dataset: DatasetConfig) -> list[str]:
        """Checks whose column the dataset cannot give them, each naming its field."""
        problems = []
        known = set(dataset.features)
        if dataset.id_column is not None:
            known.add(dataset.id_column)
        for i, inv in enumerate(self.invariance):
            where = f"gates.behaviour.invariance[{i}]"
            if inv.column not in known:
                problems.append(f"{where}.column: {inv.column!r} is not a feature or the id column")
            elif inv.column in dataset.numeric_features and any(
                isinstance(v, bool | str) for v in inv.values
            ):
                problems.append(
                    f"{where}.values: {inv.column!r} is numeric, values must be numbers"
                )
        for i, d in enumerate(self.directional):
            if d.column not in dataset.numeric_features:
                problems.append(
                    f"gates.behaviour.directional[{i}].column: {d.column!r} is not a numeric "
                    "feature (a directional check adds delta to a number)"
                )
        sliceable = set(dataset.features) | set(dataset.slice_columns)
        for i, s in enumerate(self.slice_gap):
            if s.column not in sliceable:
                problems.append(
                    f"gates.behaviour.slice_gap[{i}].column: {s.column!r} is not a feature; "
                    "list another column in dataset.slice_columns to slice by it"
                )
        return problems


class DriftGateConfig(_Section):
    """PSI bands: below `psi_warn` stable, up to `psi_alert` a warning, above it drift."""

    psi_warn: float = Field(default=0.1, ge=0.0)
    psi_alert: float = Field(default=0.25, gt=0.0)
    min_rows: int = Field(default=200, ge=1)
    bins: int = Field(default=10, ge=2)

    @model_validator(mode="after")
    def _check_thresholds(self) -> DriftGateConfig:
        if self.psi_warn > self.psi_alert:
            raise ValueError(f"psi_warn {self.psi_warn} is above psi_alert {self.psi_alert}")
        return self


class ShadowGateConfig(_Section):
    """The shadow verdict (`checks/shadow.py`, `mlgate shadow report`): the champion gate's
    metric, allowance and bootstrap (`gates.champion`) on live pairs that labels were fed
    back for. Fewer than `min_pairs` pairs, or than `min_labelled` labelled ones:
    inconclusive, never a pass. `max_p99_ratio`: the shadow's p99 scoring latency over the
    champion's request p99 (None: reported, not judged)."""

    min_pairs: int = Field(default=500, ge=1)
    min_labelled: int = Field(default=200, ge=1)
    max_p99_ratio: float | None = Field(default=None, gt=0.0)
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0)


class GatesConfig(_Section):
    data: DataGateConfig = DataGateConfig()
    drift: DriftGateConfig = DriftGateConfig()
    champion: ChampionGateConfig = ChampionGateConfig()
    parity: ParityGateConfig = ParityGateConfig()
    behaviour: BehaviourGateConfig = BehaviourGateConfig()
    shadow: ShadowGateConfig = ShadowGateConfig()


class RegistryConfig(_Section):
    store_dir: Path = Path(".mlgate")
    tracking_uri: str | None = None
    model_name: str = Field(default="churn", pattern=r"^[A-Za-z0-9_.-]+$")
    experiment: str = TRAINING_EXPERIMENT
    required_gates: tuple[str, ...] = ("data", "parity", "champion")
    notify_urls: tuple[str, ...] = ()
    # Who alias moves and canary verdicts are recorded as (a scheduler sets it); None or
    # empty: user@host.
    actor: str | None = None

    # Team mode: the MLflow tracking server's basic-auth user (the stack bootstraps it as the
    # server's admin); the password comes from the environment, MLGATE_REGISTRY__PASSWORD.
    username: str = "admin"
    password: SecretStr | None = None
    # Team mode: the PostgreSQL that every host's alias moves lock through (an advisory lock
    # per model and alias); None: a file lock under store_dir, which serialises this host only.
    lock_dsn: SecretStr | None = None
    lock_timeout_s: float = Field(default=120.0, gt=0.0)
    # How long a locked or unreachable registry is retried before a command stops with the
    # reason, or the service serves its last-known-good copy of the model.
    unavailable_retry_s: float = Field(default=30.0, ge=0.0)
    # A tracking server's HTTP requests: MLflow's own timeout and retry count (its defaults,
    # 120 s and 7 retries, wait minutes on a server that hangs; services/registry_access.py).
    http_timeout_s: int = Field(default=30, ge=1)
    http_max_retries: int = Field(default=2, ge=0)

    def resolved_tracking_uri(self) -> str:
        if self.tracking_uri:
            return self.tracking_uri
        return f"sqlite:///{(self.store_dir / 'mlflow.db').resolve()}"

    def last_known_good_dir(self) -> Path:
        """Where the service keeps a verified copy of each model it fetched from the
        registry, served while the registry cannot be reached (services/model_store.py)."""
        return self.store_dir / "last_known_good"

    def artifact_location(self) -> str:
        return (self.store_dir / "artifacts").resolve().as_uri()


class ServingConfig(_Section):
    """The prediction service. `max_batch_size` caps the rows of one ONNX Runtime call;
    `max_latency_ms` is the longest a request may wait for the scorer before it is shed
    with a 503 (overload protection, far above any latency at a load the host can serve)."""

    class ApiKey(_Section):
        """A client's key, held as the sha256 hex digest of its token, never the token."""

        name: str = Field(min_length=1)
        sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
        revoked: bool = False
        # None: the service's rate_limit_per_s and rate_limit_burst.
        rate_limit_per_s: float | None = Field(default=None, gt=0.0)
        rate_limit_burst: int | None = Field(default=None, ge=1)

    host: str = "127.0.0.1"
    port: int = Field(default=3000, ge=1, le=65535)
    alias: str = CHAMPION_ALIAS
    # What the service serves, `NAME@ALIAS` or `NAME/VERSION` (None: `alias` of
    # `registry.model_name`); the launcher sets it for each instance it starts.
    model: ModelRef | None = None
    max_batch_size: int = Field(default=256, ge=1)
    max_latency_ms: int = Field(default=2000, ge=1)
    # Per worker: prediction requests past their headers and not yet answered. One more is
    # shed at once (503 with Retry-After), before its body is read or parsed, so that an
    # overload costs the worker almost nothing per refused request (bench/overload.py).
    max_in_flight: int = Field(default=128, ge=1)
    max_rows_per_request: int = Field(default=1000, ge=1)
    # The longest categorical value a request may send, in characters (longer: a 422 naming
    # the field). The service refuses to start a model that knows a longer category.
    max_category_chars: int = Field(default=DEFAULT_MAX_CATEGORY_CHARS, ge=1)
    # None: sized from max_rows_per_request and the number of features.
    max_body_bytes: int | None = Field(default=None, ge=1024)
    workers: int = Field(default=1, ge=1)
    # GPUs requested in the service's resources (`bentoml build`, BentoCloud, containers).
    gpus: int = Field(default=0, ge=0)
    # The canary's two instances say which one answered; the launcher sets it for each.
    variant: str = Field(default="stable", pattern=r"^[A-Za-z0-9_.-]+$")
    # `mlgate init` and `mlgate keys create` add keys here. No keys here and none in
    # MLGATE_API_KEYS: the service is open (said at start-up), so `mlgate serve` refuses to
    # start it without --insecure-no-auth.
    api_keys: tuple[ApiKey, ...] = ()
    rate_limit_per_s: float = Field(default=100.0, gt=0.0)
    rate_limit_burst: int = Field(default=200, ge=1)
    request_timeout_s: float = Field(default=60.0, gt=0.0)
    # Who may read /metrics, /model, /docs.json and the API page without a key: `local`
    # (processes on this host's loopback that no proxy forwarded: the canary controller, a
    # Prometheus beside the service), `key` (nobody), `public` (everyone).
    internal_endpoints: Literal["local", "key", "public"] = "local"
    # The Swagger UI page at `/`, from BentoML's own files and no third-party script; it reads
    # /docs.json, so it works for whoever `internal_endpoints` lets read that. Off: a 404.
    docs_page: bool = False
    # Failed authentications (401/403) per client address: a burst, then this many a second;
    # past that the address gets 429s. This host's own unproxied processes are not counted.
    failed_auth_per_s: float = Field(default=0.2, gt=0.0)
    failed_auth_burst: int = Field(default=20, ge=1)
    # Peers whose X-Forwarded-For names the client (the canary's HAProxy runs on loopback).
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    # Slow clients: a request's headers must all arrive within header_timeout_s of its first
    # byte (or of the connection's start); an idle keep-alive connection closes after
    # keep_alive_s.
    header_timeout_s: float = Field(default=10.0, gt=0.0)
    keep_alive_s: int = Field(default=5, ge=1)
    # Shadow deployments (`mlgate shadow start`): how often each worker asks the registry
    # which version shadows, and the rows its queue holds before it drops (never waits).
    shadow_poll_s: float = Field(default=5.0, gt=0.0)
    # A service started on an alias (not a pinned version) asks the registry this often
    # which version the alias names, and swaps to it once fetched, verified and warmed up
    # (services/alias_watch.py); 0: it serves what it started with until restarted.
    alias_poll_s: float = Field(default=3.0, ge=0.0)
    shadow_queue_rows: int = Field(default=20_000, ge=1)
    access_log: bool = False
    trace_requests: bool = False
    inference_log_dir: Path | None = None
    # Team mode: a filesystem URI that monitoring on other hosts reads (`s3://bucket/prefix`,
    # `gs://bucket/prefix`, `file:///shared/dir`); set it or inference_log_dir, not both.
    inference_log_uri: str | None = None
    inference_log_max_queued_rows: int = Field(default=100_000, ge=1)
    inference_log_flush_rows: int = Field(default=20_000, ge=1)
    inference_log_flush_s: float = Field(default=5.0, gt=0.0)

    @field_validator("trusted_proxies")
    @classmethod
    def _check_trusted_proxies(cls, proxies: tuple[str, ...]) -> tuple[str, ...]:
        for proxy in proxies:
            try:
                ipaddress.ip_address(proxy)
            except ValueError:
                raise ValueError(
                    f"{proxy!r} is not an IP address (a trusted proxy is named by the address "
                    "it connects from)"
                ) from None
        return proxies

    @field_validator("inference_log_uri")
    @classmethod
    def _check_inference_log_uri(cls, uri: str | None) -> str | None:
        if uri is None:
            return None
        scheme, sep, rest = uri.partition("://")
        if (
            not sep
            or not scheme[:1].isalpha()
            or not all(c.isalnum() or c in "+.-" for c in scheme)
        ):
            raise ValueError(
                f"{uri!r} is not a URI (scheme://...); a local directory goes in "
                "serving.inference_log_dir"
            )
        if scheme.lower() not in INFERENCE_LOG_URI_SCHEMES:
            raise ValueError(
                f"unknown scheme {scheme!r} for the inference log; one of "
                f"{', '.join(INFERENCE_LOG_URI_SCHEMES)}"
            )
        where = rest.split("?", 1)[0]
        if scheme.lower() == "file" and not where.startswith("/"):
            raise ValueError("a file URI names an absolute path on every host: file:///shared/dir")
        if scheme.lower() in ("s3", "gs", "gcs", "abfs", "abfss") and not where.split("/")[0]:
            raise ValueError(f"a {scheme} URI names its bucket: {scheme}://bucket/prefix")
        return uri

    @model_validator(mode="after")
    def _one_inference_log_location(self) -> ServingConfig:
        if self.inference_log_dir is not None and self.inference_log_uri is not None:
            raise ValueError(
                "set serving.inference_log_dir (a local directory) or serving.inference_log_uri "
                "(a filesystem URI), not both"
            )
        return self


class MonitorConfig(_Section):
    """The monitoring flow's window and the policy that turns drift into retraining."""

    window_hours: float = Field(default=1.0, gt=0.0)
    consecutive_windows: int = Field(default=3, ge=1)
    cooldown_hours: float = Field(default=24.0, ge=0.0)
    max_retrains_per_day: int = Field(default=2, ge=0)
    # A window whose ROC AUC, estimated from the champion's calibrated scores before labels
    # arrive, is this far below its holdout ROC AUC counts like a drifted window.
    max_estimated_drop: float = Field(default=0.05, gt=0.0, le=1.0)
    incoming_dir: Path | None = None
    monitor_cron: str = "0 * * * *"
    training_cron: str = "0 3 * * 1"


class CanaryConfig(_Section):
    """The canary rollout: the canary's share of traffic at each step (percent, ending at
    100), how often a step is judged, and the guardrails (`checks/canary.py`). A step
    without `min_requests` per side is inconclusive; one still inconclusive after
    `max_wait_s` rolls back. `public_port` is HAProxy's (None: `serving.port`). With
    `enabled`, the training flow sets only `@challenger` and the canary moves `@champion`."""

    enabled: bool = False
    steps: tuple[int, ...] = (5, 25, 50, 100)
    interval_s: float = Field(default=60.0, gt=0.0)
    max_wait_s: float = Field(default=900.0, gt=0.0)
    min_requests: int = Field(default=100, ge=1)
    max_error_rate_delta: float = Field(default=0.01, ge=0.0, le=1.0)
    max_p99_ratio: float = Field(default=1.5, ge=1.0)
    min_p99_delta_ms: float = Field(default=5.0, ge=0.0)
    max_score_psi: float = Field(default=0.25, gt=0.0)
    psi_bins: int = Field(default=10, ge=2)
    max_invalid_outputs: int = Field(default=0, ge=0)
    # The canary's cost per 1,000 predictions over the stable's (`cost:` prices; None: the
    # ratio is reported, not judged).
    max_cost_ratio: float | None = Field(default=None, gt=0.0)
    public_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_timeout_s: float = Field(default=2.0, gt=0.0)
    start_timeout_s: float = Field(default=300.0, gt=0.0)
    drain_timeout_s: float = Field(default=30.0, gt=0.0)

    @model_validator(mode="after")
    def _check_steps(self) -> CanaryConfig:
        steps = list(self.steps)
        if len(steps) < 2 or steps[-1] != 100 or any(not 0 < p <= 100 for p in steps):
            raise ValueError(f"steps must end at 100 after at least one step below it: {steps}")
        if steps != sorted(set(steps)):
            raise ValueError(f"steps must increase strictly: {steps}")
        if self.max_wait_s < self.interval_s:
            raise ValueError(f"max_wait_s {self.max_wait_s} is below interval_s {self.interval_s}")
        return self


class CostConfig(_Section):
    """What serving costs: the price of one CPU core for an hour and of one GPU for an hour,
    applied to the CPU seconds the service's workers spend and the wall seconds of the GPUs it
    holds (`checks/cost.py`). `budget_per_1000` is the cost per 1,000 predictions above which
    `mlgate slo rules` alerts (None: no budget alert)."""

    price_per_core_hour: float = Field(default=0.05, ge=0.0)
    price_per_gpu_hour: float = Field(default=3.0, ge=0.0)
    budget_per_1000: float | None = Field(default=None, gt=0.0)


class CliConfig(_Section):
    """The `mlgate` command's warm process (flows/cli_warm.py): with `warm`, flow commands
    (`train`, `monitor`, `score`) run forked from a per-project process that has imported
    the flows and keeps the project's local Prefect server up; it exits after `warm_idle_s`
    seconds without a run (stopping that server)."""

    warm: bool = True
    warm_idle_s: float = Field(default=900.0, gt=0.0)


class KubernetesConfig(_Section):
    """What `mlgate deploy render --target kubernetes` writes (checks/kubernetes.py): where the
    objects go, the image (`<registry>/mlgate:<tag>`, `mlgate-gpu` when serving.gpus > 0, as
    `bentoml containerize` tags the bentofiles' bentos), the Secret holding MLGATE_API_KEYS,
    the Prometheus the canary analysis and KEDA query, and the load the replica floor is sized
    for: `expected_peak_rps` over slo.capacity_rps (Little's law). The NetworkPolicy admits
    the service's port from the Prometheus pods (`prometheus_namespace`, `prometheus_pod_labels`)
    and from clients in `client_namespaces` (None: from anywhere, in or outside the cluster)."""

    namespace: str = Field(default="mlgate", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    image_registry: str | None = None
    image_tag: str = Field(default="latest", pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
    api_keys_secret: str = Field(
        default="mlgate-api-keys", pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
    )
    prometheus_address: str = "http://prometheus-operated.monitoring.svc:9090"
    expected_peak_rps: float | None = Field(default=None, gt=0.0)
    max_replicas: int = Field(default=10, ge=1)
    cpu: str = "1"
    memory: str = "2Gi"
    network_policy: bool = True
    prometheus_namespace: str = Field(
        default="monitoring", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
    )
    prometheus_pod_labels: dict[str, str] = Field(
        default_factory=lambda: {"app.kubernetes.io/name": "prometheus"}, min_length=1
    )
    client_namespaces: tuple[str, ...] | None = None


class OrchestrationConfig(_Section):
    """Where flows run. No `api_url`: Prefect's embedded local API, flows in-process (the
    default). Team mode: a Prefect server, its basic-auth string (`user:password`, from the
    environment: MLGATE_ORCHESTRATION__AUTH_STRING) and the process work pool its workers
    poll."""

    api_url: str | None = None
    auth_string: SecretStr | None = None
    work_pool: str = Field(default="mlgate-pool", pattern=r"^[A-Za-z0-9_.-]+$")
    # A worker that dies mid-run (flows/deploy.py, flows/reconcile.py): each deployment run
    # sends a heartbeat every `heartbeat_s` (Prefect's minimum is 30), a run silent for
    # `crash_after_s` is marked Crashed, and a crashed training run is submitted again at
    # most `crash_resubmits` times.
    heartbeat_s: int = Field(default=30, ge=30)
    crash_after_s: int = Field(default=90, gt=0)
    crash_resubmits: int = Field(default=1, ge=0)

    @model_validator(mode="after")
    def _check_crash_after(self) -> OrchestrationConfig:
        if self.crash_after_s <= self.heartbeat_s:
            raise ValueError(
                f"crash_after_s {self.crash_after_s} must exceed heartbeat_s "
                f"{self.heartbeat_s}: a healthy run would be marked Crashed between beats"
            )
        return self


class DaskConfig(_Section):
    """Parallel work (candidates, batch-scoring partitions): None runs it here, sequentially;
    team mode names a Dask scheduler (`tcp://host:8786`) that prefect-dask submits to."""

    scheduler_address: str | None = None


class StackConfig(_Section):
    """Team mode's servers that `mlgate stack up` runs on this host as local processes bound to
    127.0.0.1, their state under `dir` (None: `<registry.store_dir>/stack`). A part with
    `start: false` runs elsewhere: clients reach it through `registry.tracking_uri`,
    `registry.lock_dsn`, `orchestration.api_url` or `dask.scheduler_address`."""

    class Postgres(_Section):
        start: bool = True
        port: int = Field(default=5433, ge=1, le=65535)
        # PostgreSQL refuses to run as root: as root, the stack runs it as this system user
        # (created when missing); otherwise as the current user.
        os_user: str = Field(default="mlgate-pg", pattern=r"^[a-z_][a-z0-9_-]*$")

    class Mlflow(_Section):
        start: bool = True
        port: int = Field(default=5000, ge=1, le=65535)
        workers: int = Field(default=2, ge=1)
        # None: databases on the stack's PostgreSQL. With postgres.start false, both are needed.
        backend_store_uri: SecretStr | None = None
        auth_database_uri: SecretStr | None = None
        # None: `<dir>/mlflow-artifacts`, served through the tracking server (proxied).
        artifacts_destination: str | None = None
        # Seconds a checked password stays accepted by each server worker without hashing it
        # again (the hash costs about a second on 2 busy cores); 0 checks every request. A
        # password changed through the API reaches the other workers after at most this.
        auth_cache_s: int = Field(default=60, ge=0)

    class Prefect(_Section):
        start: bool = True
        port: int = Field(default=4200, ge=1, le=65535)
        workers: int = Field(default=2, ge=0)
        # Each worker beside a warm process that has imported mlgate's flows and forks their
        # runs (flows/warm_start.py); false: a fresh `python -m prefect.engine` per run.
        warm_start: bool = True
        # Seconds between a worker's queries for runs to start (Prefect's default is 10: a
        # run submitted on demand would wait 5 s on average before a worker takes it).
        poll_s: float = Field(default=2.0, gt=0.0)
        # None: a database on the stack's PostgreSQL (`postgresql+asyncpg://...` otherwise).
        database_url: SecretStr | None = None

    class Dask(_Section):
        start: bool = True
        port: int = Field(default=8786, ge=1, le=65535)
        dashboard_port: int = Field(default=8787, ge=1, le=65535)
        workers: int = Field(default=2, ge=0)
        nthreads: int = Field(default=1, ge=1)

    dir: Path | None = None
    start_timeout_s: float = Field(default=300.0, gt=0.0)
    postgres: Postgres = Postgres()
    mlflow: Mlflow = Mlflow()
    prefect: Prefect = Prefect()
    dask: Dask = Dask()

    @model_validator(mode="after")
    def _check_databases(self) -> StackConfig:
        if self.postgres.start:
            return self
        missing = []
        if self.mlflow.start and self.mlflow.backend_store_uri is None:
            missing.append("mlflow.backend_store_uri")
        if self.mlflow.start and self.mlflow.auth_database_uri is None:
            missing.append("mlflow.auth_database_uri")
        if self.prefect.start and self.prefect.database_url is None:
            missing.append("prefect.database_url")
        if missing:
            raise ValueError(
                f"postgres.start is false, so the stack has no database of its own: set "
                f"{', '.join(missing)}"
            )
        return self


# A Prometheus duration of one unit (`5m`, `1h`, `3d`): the windows of `slo.burn_windows`.
PROM_DURATION = r"^[1-9][0-9]*[smhdw]$"
_PROM_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def prom_duration_s(text: str) -> int:
    """Seconds in a one-unit Prometheus duration: "30m" -> 1800."""
    return int(text[:-1]) * _PROM_UNIT_S[text[-1]]


class SloConfig(_Section):
    """Service level objectives in users' terms over a rolling `window_days`, which `mlgate
    slo rules` turns into Prometheus rules (checks/slo_rules.py). Availability is the share
    of `/predict` answers that are not 5xx; `latency_p95_s` is met when 95 % of requests are
    answered within it (`latency_p99_s`: 99 %), and each must be a bound of the service's
    latency buckets. A burn window pair alerts when both windows spend the error budget
    `factor` times as fast as would spend it exactly in `window_days` (the SRE workbook's
    multi-window burn rates). The leading indicators (load shed by the batcher, its batch
    fill, load against `capacity_rps`, inference-log drops) warn after `leading_for`."""

    class BurnWindow(_Section):
        long: str = Field(pattern=PROM_DURATION)
        short: str = Field(pattern=PROM_DURATION)
        factor: float = Field(gt=0.0)
        severity: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")

        @model_validator(mode="after")
        def _check_windows(self) -> SloConfig.BurnWindow:
            if prom_duration_s(self.short) >= prom_duration_s(self.long):
                raise ValueError(f"short window {self.short} is not shorter than {self.long}")
            return self

    window_days: float = Field(default=30.0, gt=0.0)
    availability: float = Field(default=0.999, gt=0.0, lt=1.0)
    latency_p95_s: float | None = Field(default=0.05, gt=0.0)
    latency_p99_s: float | None = Field(default=0.2, gt=0.0)
    # No series on `/metrics` measures these yet: `mlgate slo rules` names them as objectives
    # it could not turn into rules (the monitoring flow measures drift and estimates).
    champion_max_age_days: float | None = Field(default=None, gt=0.0)
    max_score_psi: float | None = Field(default=None, gt=0.0)
    min_estimated_metric: float | None = None
    # The SRE workbook's defaults for a 30-day window: 2 % of the budget spent in an hour or
    # 5 % in six hours pages; 10 % in a day or in three days opens a ticket.
    burn_windows: tuple[BurnWindow, ...] = (
        BurnWindow(long="1h", short="5m", factor=14.4, severity="page"),
        BurnWindow(long="6h", short="30m", factor=6.0, severity="page"),
        BurnWindow(long="1d", short="2h", factor=3.0, severity="ticket"),
        BurnWindow(long="3d", short="6h", factor=1.0, severity="ticket"),
    )
    leading_for: str = Field(default="10m", pattern=PROM_DURATION)
    # Share of requests answered 503 (shed by the batcher: its queue full, or a wait past
    # serving.max_latency_ms) above which it warns.
    max_shed_share: float = Field(default=0.0, ge=0.0, lt=1.0)
    # Mean rows per ONNX Runtime call over serving.max_batch_size: a batcher that keeps
    # filling its batches has more queued than it scores.
    max_batch_fill: float = Field(default=0.5, gt=0.0, le=1.0)
    # Requests/s one instance answers within its latency objectives (measure it: `make
    # bench`); None: no load-against-capacity alert.
    capacity_rps: float | None = Field(default=None, gt=0.0)
    max_capacity_share: float = Field(default=0.8, gt=0.0, le=1.0)
    max_log_drop_share: float = Field(default=0.0, ge=0.0, lt=1.0)
    # Where the runbook lives (a wiki page); alerts link `<runbook_url>#<alertname>`.
    runbook_url: str | None = None

    def objectives(self) -> dict[str, tuple[float, float | None]]:
        """Each burn-rate objective by name: (share of good requests, latency bound or None)."""
        found: dict[str, tuple[float, float | None]] = {"availability": (self.availability, None)}
        if self.latency_p95_s is not None:
            found["latency_p95"] = (0.95, self.latency_p95_s)
        if self.latency_p99_s is not None:
            found["latency_p99"] = (0.99, self.latency_p99_s)
        return found

    @model_validator(mode="after")
    def _check_burn_windows(self) -> SloConfig:
        if not self.burn_windows:
            raise ValueError("burn_windows needs at least one window pair")
        window_s = self.window_days * 86400
        for w in self.burn_windows:
            if prom_duration_s(w.long) > window_s:
                raise ValueError(
                    f"burn window {w.long}/{w.short} is longer than window_days "
                    f"{self.window_days:g}"
                )
            for name, (good, _) in self.objectives().items():
                if w.factor * (1.0 - good) >= 1.0:
                    raise ValueError(
                        f"burn window {w.long}/{w.short} at factor {w.factor} can never fire for "
                        f"{name} {good}: more than every request would have to miss it"
                    )
        return self


class MlgateConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        extra="forbid",
        frozen=True,
    )

    dataset: DatasetConfig
    train: TrainConfig = TrainConfig()
    gates: GatesConfig = GatesConfig()
    registry: RegistryConfig = RegistryConfig()
    serving: ServingConfig = ServingConfig()
    monitor: MonitorConfig = MonitorConfig()
    canary: CanaryConfig = CanaryConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    dask: DaskConfig = DaskConfig()
    stack: StackConfig = StackConfig()
    slo: SloConfig = SloConfig()
    cost: CostConfig = CostConfig()
    cli: CliConfig = CliConfig()
    kubernetes: KubernetesConfig = KubernetesConfig()

    @model_validator(mode="after")
    def _check_served_model(self) -> MlgateConfig:
        served = self.serving.model
        if served is not None and served.name != self.registry.model_name:
            raise ValueError(
                f"serving.model {str(served)!r} names model {served.name!r}, but "
                f"registry.model_name is {self.registry.model_name!r}"
            )
        return self

    @model_validator(mode="after")
    def _check_behaviour_columns(self) -> MlgateConfig:
        problems = self.gates.behaviour.column_problems(self.dataset)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def served_model(self) -> ModelRef:
        """What the service serves: `serving.model`, else `serving.alias` of the model."""
        return self.serving.model or ModelRef(self.registry.model_name, alias=self.serving.alias)

    def inference_log_dir(self) -> Path:
        """The local directory of the inference log (embedded mode); with
        `serving.inference_log_uri` set the log is not there: see `inference_log_location`."""
        return self.serving.inference_log_dir or self.registry.store_dir / "inference_log"

    def inference_log_location(self) -> Path | str:
        """Where the service writes the inference log and monitoring reads it: the URI of
        `serving.inference_log_uri` (team mode), else the local directory."""
        return self.serving.inference_log_uri or self.inference_log_dir()

    def incoming_dir(self) -> Path:
        return self.monitor.incoming_dir or self.registry.store_dir / "incoming"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the file: CI and schedulers override single fields.
        return (env_settings, init_settings)


def env_override_name(*path: str) -> str:
    """The variable that overrides a field: ("serving", "model") -> MLGATE_SERVING__MODEL."""
    return ENV_PREFIX + ENV_NESTED_DELIMITER.join(p.upper() for p in path)


def _format_validation_error(path: Path, err: ValidationError) -> str:
    lines = [f"invalid config {path}:"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (not allowed)"
        lines.append(f"  {field}: {msg}")
    return "\n".join(lines)


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative paths in the file are relative to the file, not to the working directory."""
    dataset = raw.get("dataset")
    if isinstance(dataset, dict) and isinstance(dataset.get("path"), str):
        p = Path(dataset["path"])
        dataset["path"] = str(p if p.is_absolute() else (base / p).resolve())
    for section, key in (
        ("serving", "inference_log_dir"),
        ("monitor", "incoming_dir"),
        ("stack", "dir"),
    ):
        part = raw.get(section)
        if isinstance(part, dict) and isinstance(part.get(key), str):
            p = Path(part[key])
            part[key] = str(p if p.is_absolute() else (base / p).resolve())
    registry = raw.get("registry")
    if isinstance(registry, dict) and isinstance(registry.get("store_dir"), str):
        p = Path(registry["store_dir"])
        registry["store_dir"] = str(p if p.is_absolute() else (base / p).resolve())
    elif "registry" not in raw or isinstance(registry, dict):
        raw.setdefault("registry", {})
        raw["registry"].setdefault("store_dir", str(base / ".mlgate"))
    return raw


def config_from_dict(raw: dict[str, Any], source: Path | str = "<dict>") -> MlgateConfig:
    try:
        return MlgateConfig(**raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(Path(source), err)) from None


def load_config(path: Path | str = DEFAULT_CONFIG_PATH) -> MlgateConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found (create one with `mlgate init`)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return config_from_dict(_resolve_paths(raw, path.resolve().parent), path)


def dump_config(cfg: MlgateConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
