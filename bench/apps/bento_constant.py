"""BentoML's request path alone: the floor's handler mounted in BentoML with our service's
settings and timer fix, with no model and none of our work
(`bentoml serve bench.apps.bento_constant:BentoConstant`)."""

import bentoml

import services.bentoml_fixes
from bench.apps.floor_app import app

services.bentoml_fixes.cancel_timeout_timers()


@bentoml.service(
    workers=1,
    metrics={"enabled": False},
    logging={"access": {"enabled": False}},
    tracing={"excluded_urls": ["/predict"]},
)
@bentoml.asgi_app(app, path="/")
class BentoConstant:
    pass
