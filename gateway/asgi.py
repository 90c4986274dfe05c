"""ASGI entry point: Django, plus the lifespan events that start and stop the usage writer."""

import asyncio
import os
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.settings")
django_application = get_asgi_application()

from resource_server.services.usage import usage_sink  # noqa: E402 (needs Django set up first)


async def _lifespan(receive: Any, send: Any) -> None:
    # Django does not speak ASGI lifespan. Without it, uvicorn ends the worker by re-raising SIGTERM,
    # so atexit never runs: the usage writer is stopped here instead, after open requests finish.
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            usage_sink.start()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await asyncio.to_thread(usage_sink.stop)
            await send({"type": "lifespan.shutdown.complete"})
            return


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
    else:
        await django_application(scope, receive, send)
