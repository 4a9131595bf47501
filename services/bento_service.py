"""The module `bentoml serve services.bento_service:MlgateService` imports.

Environment: `MLGATE_CONFIG` (default `mlgate.yaml`), and `MLGATE_SERVE_ALIAS` or
`MLGATE_SERVE_VERSION` (neither: the config's `serving.alias`).
"""

import os

from models.config import load_config
from services.service import build_service

# The serving entry point is the one module allowed to read files at import: BentoML imports
# it in every worker process and needs the service class to exist at module level.
MlgateService = build_service(
    load_config(os.environ.get("MLGATE_CONFIG", "mlgate.yaml")),
    alias=os.environ.get("MLGATE_SERVE_ALIAS") or None,
    version=os.environ.get("MLGATE_SERVE_VERSION") or None,
)
