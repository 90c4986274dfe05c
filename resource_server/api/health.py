"""Liveness, without authentication, for load balancers and monitoring."""

from __future__ import annotations

from django.http import HttpRequest
from ninja import Router

router = Router(tags=["Operations"])


@router.get("/health", auth=None, summary="Is the gateway up", operation_id="health")
async def health(request: HttpRequest) -> dict[str, str]:
    return {"status": "ok"}
