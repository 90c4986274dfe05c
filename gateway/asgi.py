"""ASGI entry point: the lean inference routes, Django for the rest, and the usage writer's lifespan."""

import asyncio
import gc
import logging
import os
from typing import Any, cast

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.settings")
django_application = get_asgi_application()

from resource_server.api.fast import ASGIApp, InferenceApp  # noqa: E402 (needs Django set up first)
from resource_server.selectors.endpoints import routing_table  # noqa: E402 (needs Django set up first)
from resource_server.services.usage import usage_sink  # noqa: E402 (needs Django set up first)

logger = logging.getLogger("gateway")
# The usage writer's share of a worker's shutdown; deploy/gunicorn.conf.py's budget counts on it.
USAGE_STOP_SECONDS = 5.0

# django-stubs types ASGIHandler with dict scopes; it is an ordinary ASGI app.
http_application = InferenceApp(cast(ASGIApp, django_application))


async def _lifespan(receive: Any, send: Any) -> None:
    # Django does not speak ASGI lifespan. Without it, uvicorn ends the worker by re-raising SIGTERM,
    # so atexit never runs: the usage writer is stopped here instead, after open requests finish.
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            usage_sink.start()
            await worker_settle()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            # uvicorn has stopped accepting and finished or cancelled every request by now (within
            # graceful_timeout minus a reserve, see deploy/gunicorn.conf.py). What the usage writer holds
            # is journaled already; it gets a few seconds to insert it, the next start replays the rest.
            await http_application.stop()
            await asyncio.to_thread(usage_sink.stop, USAGE_STOP_SECONDS)
            await send({"type": "lifespan.shutdown.complete"})
            return


async def worker_settle() -> None:
    """Load what the worker keeps for its lifetime before the first request, then freeze it.

    The routing table brings in the SDKs its backends need. Frozen objects are left out of the garbage
    collector's full collections, which otherwise walk all of them (~50 ms with the Globus Compute SDK
    loaded) while the event loop waits: a pause every open stream sees as a late token.
    """
    try:
        await routing_table()
    except Exception:
        # The database may not be up yet: the first request loads the table instead.
        logger.warning("could not load the routing table at start-up; the first request will", exc_info=True)
    gc.collect()  # garbage left by start-up goes first: frozen, it would stay for good
    gc.freeze()


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
    else:
        await http_application(scope, receive, send)
