"""The registry's layout: every experiment, tag and artifact name mlgate writes to MLflow.

This is the only module that spells them; the registry layer (`flows/registry.py` and the
modules built on it), the model store and the canary (`services/`), the benchmarks and the
tests import them from here. Pure constants: changing one changes what is written, and what
older runs can still be read by.
"""

# Experiments.
TRAINING_EXPERIMENT = "mlgate-training"  # the default of `registry.experiment`
AUDIT_EXPERIMENT = "mlgate-audit"  # one run per alias move, deletion and canary verdict
MONITOR_EXPERIMENT = "mlgate-monitoring"  # one run per monitoring window

# Aliases.
CHAMPION_ALIAS = "champion"
CHALLENGER_ALIAS = "challenger"

# Tags of a model version (and of its training run).
SHA_TAG = "onnx_sha256"  # the sha256 of model/model.onnx; serving refuses other bytes
# Tree ensembles: the sha256 of model/model_gpu.onnx, the GPU graph (`models.tree_graph`).
GPU_SHA_TAG = "onnx_gpu_sha256"
GATE_TAG_PREFIX = "gate."  # `gate.<name>` = pass | fail | inconclusive
OUTCOME_TAG = "mlgate.outcome"  # accepted | rejected
STOPPED_AT_TAG = "mlgate.stopped_at"  # the gate a rejected run stopped at
MADE_BY_TAG = "mlgate.made_by"  # a run made outside the training flow
EVIDENCE_GATES_TAG = "evidence.gates"  # URI of the run's EVIDENCE_ARTIFACT
EVIDENCE_REPORT_TAG = "evidence.report"  # URI of the run's REPORT_ARTIFACT
ALIAS_TAG_PREFIX = "alias."  # `alias.<alias>.since` / `.until`: when a version held it
CANARY_GATE_TAG = f"{GATE_TAG_PREFIX}canary"
CANARY_TAG_PREFIX = "canary."  # `canary.<number or fact>` of the latest canary
CANARY_EVIDENCE_TAG = "evidence.canary"  # URI of the latest canary verdict's JSON
CANARY_FORCED_TAG = f"{CANARY_TAG_PREFIX}forced_start"
# Registered-model tags: the version that shadows the champion (`mlgate shadow start`), read
# by every serving worker, and since when (ISO, UTC).
SHADOW_TAG = "mlgate.shadow"
SHADOW_SINCE_TAG = "mlgate.shadow.since"
SHADOW_GATE_TAG = f"{GATE_TAG_PREFIX}shadow"
SHADOW_TAG_PREFIX = "shadow."  # `shadow.<number>` of the latest shadow verdict
SHADOW_EVIDENCE_DIR = "evidence/shadow"  # `v<version>-<time>-<verdict>.json`
SHADOW_EVIDENCE_TAG = "evidence.shadow"  # URI of the latest shadow verdict's JSON
SHADOW_VARIANT = "shadow"  # the inference log's `variant` of the shadow's rows

# An audit run: its tags, and the move with its evidence as JSON.
KIND_TAG = "mlgate.kind"  # promote | rollback | delete | canary
# On a move's record (RUNNING until the alias has moved) whose mover died mid-move, set by
# the next mover: completed (the alias had moved: FINISHED) | abandoned (it had not: KILLED).
RECOVERED_TAG = "mlgate.recovered"
MOVE_ARTIFACT = "move.json"

# Artifacts of a training run.
CONFIG_ARTIFACT = "config/mlgate.json"
MODEL_ARTIFACT_DIR = "model"  # model.onnx and schema.json: a version's source
EVIDENCE_ARTIFACT = "evidence/gates.json"
REPORT_ARTIFACT = "evidence/model_report.html"
DRIFT_ARTIFACT = "evidence/drift_vs_champion.json"
# With train.candidates: each candidate's validation score and the training-part rows used.
SELECTION_ARTIFACT = "evidence/selection.json"
DATA_DOCS_ARTIFACT_DIR = "evidence/data_docs"
CANARY_EVIDENCE_DIR = "evidence/canary"  # `v<version>-<verdict>.json`
PROFILE_ARTIFACT = "reference/data_profile.json"
HISTOGRAMS_ARTIFACT = "reference/histograms.json"
# Isotonic calibration of the holdout scores, for performance estimates before labels.
CALIBRATOR_ARTIFACT = "reference/calibrator.json"
# Holdout features and scores: the raw side of Evidently's visual report in monitoring.
SAMPLE_ARTIFACT = "reference/sample.parquet"

# Artifacts of a monitoring run.
MONITORING_ARTIFACT = "monitoring.json"
EVIDENCE_DIR = "evidence"  # Evidently's drift_report.html
