"""Liveness, without authentication, for load balancers and monitoring."""

from __future__ import annotations

from django.http import HttpRequest
from ninja import Router

from resource_server.api.openapi import json_response
from resource_server.schemas import Health, schema_ref

router = Router(tags=["Operations"])


@router.get(
    "/health",
    auth=None,
    summary="Is the gateway up",
    operation_id="health",
    openapi_extra={
        "description": "Answers without credentials while the gateway process serves requests; it checks "
        "neither the database nor the model servers.",
        "responses": {200: json_response("The gateway is up.", schema_ref(Health))},
    },
)
async def health(request: HttpRequest) -> dict[str, str]:
    return {"status": "ok"}
