"""OpenAI-compatible routes, under /resource_server/v1/ and FIRST's /resource_server/{cluster}/{framework}/v1/."""

from __future__ import annotations

from typing import Annotated, Any

from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.request import RawPostDataException
from ninja import Path, Router

from resource_server.api.openapi import AUTHENTICATED, documented, inference_doc, json_response
from resource_server.api.security import bearer_auth
from resource_server.dispatch.base import Route
from resource_server.errors import InvalidRequest
from resource_server.schemas import ModelList, schema_ref
from resource_server.selectors.endpoints import model_list
from resource_server.services.inference import JsonResult, inference_run

router = Router(auth=bearer_auth, tags=["OpenAI-compatible"])

FIRST_PREFIX = "/{cluster}/{framework}"
_SUMMARIES = {
    Route.CHAT: "Create a chat completion",
    Route.COMPLETIONS: "Create a text completion",
    Route.EMBEDDINGS: "Create embeddings",
}


def _stream_response(events: Any) -> StreamingHttpResponse:
    response = StreamingHttpResponse(events, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx must pass each event on at once
    return response


async def _infer(
    request: HttpRequest, route: Route, cluster: str | None, framework: str | None
) -> HttpResponse | StreamingHttpResponse:
    try:
        raw_body = request.body
    except RawPostDataException:
        raise InvalidRequest("The request body could not be read.") from None
    result = await inference_run(
        principal=request.auth,  # type: ignore[attr-defined]
        route=route,
        raw_body=raw_body,
        request_id=request.request_id,  # type: ignore[attr-defined]
        client_request_id=request.client_request_id,  # type: ignore[attr-defined]
        cluster=cluster,
        framework=framework,
    )
    if isinstance(result, JsonResult):
        return HttpResponse(result.content, content_type="application/json")
    return _stream_response(result.events)


# FIRST's path parameters, with the values the docs page's "Try it out" fills in.
ClusterName = Annotated[
    str, Path(..., description="A cluster's name, as `owned_by` in `GET /v1/models` shows it.", example="demo")
]
FrameworkName = Annotated[str, Path(..., description="The serving framework on that cluster.", example="vllm")]


def _add_inference_routes(route: Route) -> None:
    async def generic(request: HttpRequest) -> HttpResponse | StreamingHttpResponse:
        return await _infer(request, route, None, None)

    async def on_cluster(
        request: HttpRequest, cluster: ClusterName, framework: FrameworkName
    ) -> HttpResponse | StreamingHttpResponse:
        return await _infer(request, route, cluster, framework)

    name = route.value.replace("/", "_")
    for path, view, suffix in (
        (f"/v1/{route.value}", generic, ""),
        (f"{FIRST_PREFIX}/v1/{route.value}", on_cluster, "_on_cluster"),
    ):
        router.add_api_operation(
            path,
            ["POST"],
            view,
            operation_id=f"{name}{suffix}",
            summary=_SUMMARIES[route] + (" on a given cluster and framework" if suffix else ""),
            openapi_extra=inference_doc(route, on_cluster=bool(suffix)),
        )


for _route in Route:
    _add_inference_routes(_route)


def _models_response(models: list[dict[str, object]]) -> dict[str, Any]:
    return {"object": "list", "data": models}


_MODELS = "The models your credentials may use, each once by name, with the cluster that serves it."
_MODELS_OK = json_response("The models, sorted by name.", schema_ref(ModelList))


@router.get(
    "/v1/models",
    summary="List the models you can use",
    operation_id="models_list",
    openapi_extra=documented(_MODELS, *AUTHENTICATED, ok=_MODELS_OK),
)
async def models(request: HttpRequest) -> dict[str, Any]:
    return _models_response(await model_list(principal=request.auth))  # type: ignore[attr-defined]


@router.get(
    f"{FIRST_PREFIX}/v1/models",
    summary="List the models you can use on a cluster",
    operation_id="models_list_on_cluster",
    openapi_extra=documented(
        _MODELS.removesuffix(".") + ", on the named cluster and framework (FIRST's path).",
        *AUTHENTICATED,
        "404",
        ok=_MODELS_OK,
    ),
)
async def models_on_cluster(request: HttpRequest, cluster: ClusterName, framework: FrameworkName) -> dict[str, Any]:
    return _models_response(await model_list(principal=request.auth, cluster=cluster, framework=framework))  # type: ignore[attr-defined]
