"""The relay route's service: accept one stream message from a compute function, or refuse it.

The hubs that carry the messages to the waiting handler, and the message model, are in `adapters/relay.py`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from django.conf import settings

from resource_server.adapters.relay import Delivery, RelayHub, RelayMessage
from resource_server.errors import ErrorCode, InvalidRequest, PermissionDenied, RateLimited

_REFUSED = "Unknown relay task or wrong token."


async def relay_deliver(
    *,
    hub: RelayHub,
    task_id: str,
    authorization: str,
    content_length: int | None,
    read_body: Callable[[int], Awaitable[bytes]],
) -> None:
    """Accept one message for a waiting stream, or raise the error the compute function acts on.

    403: unknown task, wrong or revoked token, or another attempt of the task owns the stream (the function
    stops); 413: too large; 400: malformed;
    429: the handler is far behind (the function retries with backoff).
    """
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or not await hub.authorized(task_id, token):
        raise PermissionDenied(_REFUSED, code=ErrorCode.RELAY_FORBIDDEN)
    limit = settings.GATEWAY.RELAY_MAX_MESSAGE_BYTES
    too_large = InvalidRequest(f"A relay message may be at most {limit} bytes.", code=ErrorCode.REQUEST_TOO_LARGE)
    if content_length is not None and content_length > limit:
        raise too_large  # before the body is loaded into memory
    body = await read_body(limit)  # only now: a refused sender never makes the gateway read its body
    if len(body) > limit:
        raise too_large
    delivery = await hub.append(task_id, RelayMessage.parse(body))
    if delivery is Delivery.GONE:
        raise PermissionDenied(_REFUSED, code=ErrorCode.RELAY_FORBIDDEN)
    if delivery is Delivery.SUPERSEDED:
        # A retried run of the task: the stream already carries another run's answer (the function stops).
        raise PermissionDenied(
            "Another attempt of this task is already streaming; this attempt must stop.",
            code=ErrorCode.RELAY_FORBIDDEN,
        )
    if delivery is Delivery.FULL:
        raise RateLimited(
            "The gateway is behind on this stream; retry shortly.", retry_after=1, code=ErrorCode.RELAY_FULL
        )
