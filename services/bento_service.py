"""The module `bentoml serve services.bento_service:MlgateService` imports.

BentoML imports it by name in processes it starts, so nothing can be passed to it but the
environment. It reads one variable that is not a config override: `MLGATE_CONFIG`, the path
of the config file (default `mlgate.yaml`), which `services/launcher.py` sets for its child
and a bento sets in `envs` (services/bentofile.yaml). Everything else, including which model
to serve (`serving.model`, else `serving.alias`) and the variant, is in the config, with the
usual `MLGATE_<SECTION>__<FIELD>` overrides (`MLGATE_SERVING__MODEL=churn/3`).
"""

import os

from models.config import CONFIG_PATH_ENV, DEFAULT_CONFIG_PATH, load_config
from services.service import build_service

# The serving entry point is the one module allowed to read files at import: BentoML imports
# it in every worker process and needs the service class to exist at module level.
_cfg = load_config(os.environ.get(CONFIG_PATH_ENV, str(DEFAULT_CONFIG_PATH)))
MlgateService = build_service(_cfg, _cfg.served_model())
