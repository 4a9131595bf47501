"""Who may read the service's operator endpoints: `/metrics`, `/model`, `/docs.json` and the
API page, as `serving.internal_endpoints` and `serving.docs_page` say.

`/predict` checks its own key (services/app.py) and the probes (`/livez`, `/healthz`,
`/readyz`) answer everyone: load balancers and orchestrators call them without keys. The
operator endpoints tell an outsider which model serves, its features and its traffic, so:

- `local` (the default): this host's own processes on loopback that no proxy forwarded read
  them without a key (the canary controller scrapes its instances this way, and so does a
  Prometheus beside the service); everyone else needs a key, like `/predict`, and counts
  toward the failed-authentication limit of their address;
- `key`: everyone needs a key; `public`: nobody does.

The API page is off unless `serving.docs_page`; when on, it is this module's own HTML over
BentoML's bundled Swagger UI files, with a Content-Security-Policy that allows no other
origin (BentoML's page loads Google Tag Manager). With authentication off (`mlgate serve
--insecure-no-auth`) every endpoint is public: the operator chose that.

An ASGI middleware, because BentoML matches its own routes (`/`, `/docs.json`,
`/static_content`) ahead of mounted apps; other paths pay a set lookup.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from services.auth import client_address

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from models.config import ServingConfig
    from services.app import PredictEndpoint

OPERATOR_PATHS = frozenset({"/metrics", "/model", "/docs.json"})
PAGE_PATH = "/"
PAGE_FILES = "/static_content/"

# Swagger UI from the files BentoML ships (served by its /static_content mount) and nothing
# else: no analytics, no CDN.
API_PAGE = b"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="UTF-8">
<title>mlgate prediction service</title>
<link rel="stylesheet" type="text/css" href="./static_content/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="./static_content/swagger-ui-bundle.js" charset="UTF-8"></script>
<script src="./static_content/swagger-ui-standalone-preset.js" charset="UTF-8"></script>
<script src="./static_content/swagger-initializer.js" charset="UTF-8"></script>
</body>
</html>
"""
# Swagger UI sets inline styles and shows its logos as data: URIs.
PAGE_POLICY = (
    b"default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    b"frame-ancestors 'none'"
)


class ExposureGuard:
    """The ASGI middleware in front of the whole service (see the module's docstring)."""

    def __init__(self, app: ASGIApp, predict: PredictEndpoint, serving: ServingConfig) -> None:
        self.app = app
        self.predict = predict
        self.access = serving.internal_endpoints
        self.docs_page = serving.docs_page
        self.trusted = frozenset(serving.trusted_proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        page = path == PAGE_PATH or path.startswith(PAGE_FILES)
        if scope["type"] != "http" or not (page or path in OPERATOR_PATHS):
            await self.app(scope, receive, send)
            return
        if page and not self.docs_page:
            await _answer(send, 404, _error("the API page is off (serving.docs_page)"))
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            status, message, headers = refusal
            await _answer(send, status, _error(message), headers)
        elif path == PAGE_PATH:
            await _answer(
                send,
                200,
                API_PAGE,
                ((b"content-security-policy", PAGE_POLICY),),
                content_type=b"text/html; charset=utf-8",
            )
        else:
            await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> tuple[int, str, tuple[tuple[bytes, bytes], ...]] | None:
        """Why this request may not read an operator endpoint, or None when it may."""
        if self.access == "public":
            return None
        runtime = self.predict.runtime
        if runtime is None:
            return 503, "the model is not loaded yet; retry shortly", ((b"retry-after", b"1"),)
        authenticator = runtime.authenticator
        if not authenticator.enabled:
            return None
        authorization = forwarded_for = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"x-forwarded-for":
                forwarded_for = value
        peer = scope.get("client")
        client, local = client_address(peer[0] if peer else None, forwarded_for, self.trusted)
        if local and self.access == "local":
            return None
        _, denial = authenticator.check(authorization, None if local else client)
        if denial is None:
            return None
        return denial.status, denial.message, denial.headers


def _error(message: str) -> bytes:
    return orjson.dumps({"error": message})


async def _answer(
    send: Send,
    status: int,
    body: bytes,
    headers: tuple[tuple[bytes, bytes], ...] = (),
    content_type: bytes = b"application/json",
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", b"%d" % len(body)),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
