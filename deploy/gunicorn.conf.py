"""gunicorn settings for the gateway: uvicorn workers running the ASGI app.

Every value can be overridden on the command line or with GUNICORN_CMD_ARGS.
"""

import multiprocessing
import os

wsgi_app = "gateway.asgi:application"
worker_class = "uvicorn_worker.UvicornWorker"
bind = os.environ.get("GATEWAY_BIND", "127.0.0.1:8000")
# Without REDIS_URL the stream relay lives in each worker's memory, and a compute task's relay POSTs must reach
# the worker that holds its client: so one worker then (with two, a third of compute-backed streams failed
# with 502 relay_incomplete). With Redis, one per CPU.
workers = int(os.environ.get("GATEWAY_WORKERS") or (multiprocessing.cpu_count() if os.environ.get("REDIS_URL") else 1))
# Streams can run for many minutes: a worker must not be killed while it relays them.
timeout = 0
graceful_timeout = 30
keepalive = 75
accesslog = None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
