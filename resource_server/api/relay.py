"""The internal relay route: compute functions on cluster nodes push stream messages here.

The gateway's lean ASGI app (`api/fast.py`) serves this route the same way without Django's per-request
cost; this view is the one Django uses when the lean app is off.

Not for API clients, so it is left out of the OpenAPI docs, and it has no bearer-chain authentication:
each task carries its own single-task token (see `services/relay.py`).
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from ninja import Router

from resource_server.bootstrap import runtime
from resource_server.services.relay import relay_deliver

router = Router(auth=None, tags=["Internal"])


@router.post(
    "/internal/relay/{task_id}",
    include_in_schema=False,
    url_name="relay_message",
    operation_id="relay_message",
)
async def relay_message(request: HttpRequest, task_id: str) -> HttpResponse:
    length = request.headers.get("Content-Length", "")

    async def read_body(limit: int) -> bytes:
        return request.body  # Django's ASGI handler has read it already

    await relay_deliver(
        hub=runtime().relay_hub,
        task_id=task_id,
        authorization=request.headers.get("Authorization", ""),
        content_length=int(length) if length.isdigit() else None,
        read_body=read_body,
    )
    return HttpResponse(status=204)
