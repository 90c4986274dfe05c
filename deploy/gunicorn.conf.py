"""gunicorn settings for the gateway: uvicorn workers running the ASGI app.

Every value can be overridden on the command line or with GUNICORN_CMD_ARGS.
"""

import multiprocessing
import os
from typing import Any

wsgi_app = "gateway.asgi:application"
# uvicorn_worker.UvicornWorker with limits on request heads (size and time): see gateway/worker.py.
worker_class = "gateway.worker.GatewayWorker"
bind = os.environ.get("GATEWAY_BIND", "127.0.0.1:8000")
# Without REDIS_URL the stream relay lives in each worker's memory, and a compute task's relay POSTs must reach
# the worker that holds its client: so one worker then (with two, a third of compute-backed streams failed
# with 502 relay_incomplete). With Redis, one per CPU.
workers = int(os.environ.get("GATEWAY_WORKERS") or (multiprocessing.cpu_count() if os.environ.get("REDIS_URL") else 1))
# Streams can run for many minutes: a worker must not be killed while it relays them.
timeout = 0
# SIGTERM ends a worker in this order, sized to fit graceful_timeout (after which gunicorn SIGKILLs it):
#   1. uvicorn stops accepting connections at once;
#   2. open requests and streams get graceful_timeout - SHUTDOWN_RESERVE_SECONDS to finish, then are
#      cancelled (see post_worker_init); a cut stream is recorded (499) like one whose client left;
#   3. the ASGI lifespan shutdown gives the usage writer up to 5 s to insert what it holds
#      (UsageSink.stop), plus about 2 s to stop its threads.
# 20 + 5 + 2 s fit in 30 s. Every usage record is journaled within 10 ms of its request
# ending, so a SIGKILL during step 3 loses no more than any SIGKILL: the next start replays the journal.
graceful_timeout = 30
SHUTDOWN_RESERVE_SECONDS = 10
keepalive = 75
accesslog = None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()


def post_worker_init(worker: Any) -> None:
    """Bound how long a stopping worker waits for open streams (uvicorn waits for ever by default).

    The worker's uvicorn Config is built by then and read only when its server starts, just after.
    """
    graceful = float(worker.cfg.graceful_timeout)  # --graceful-timeout on the command line included
    # With a short graceful_timeout streams still get half of it; the journal covers a flush cut short.
    worker.config.timeout_graceful_shutdown = max(graceful - SHUTDOWN_RESERVE_SECONDS, graceful / 2)
