"""The benchmark's floor: a bare Starlette app that parses the request's JSON and answers a
constant, with no model and no framework (`uvicorn bench.apps.floor_app:app`)."""

import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


async def predict(request: Request) -> Response:
    body = json.loads(await request.body())
    n = len(body["rows"])
    answer = {
        "model_name": "churn",
        "model_version": "1",
        "predictions": [{"score": 0.5, "label": 0}] * n,
    }
    return Response(json.dumps(answer), media_type="application/json")


app = Starlette(routes=[Route("/predict", predict, methods=["POST"])])
