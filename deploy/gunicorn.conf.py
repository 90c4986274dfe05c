"""gunicorn settings for the gateway: uvicorn workers running the ASGI app.

Every value can be overridden on the command line or with GUNICORN_CMD_ARGS.
"""

import multiprocessing
import os

wsgi_app = "gateway.asgi:application"
# uvicorn_worker.UvicornWorker with limits on request heads (size and time): see gateway/worker.py.
worker_class = "gateway.worker.GatewayWorker"
bind = os.environ.get("GATEWAY_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("GATEWAY_WORKERS", max(1, multiprocessing.cpu_count())))
# Streams can run for many minutes: a worker must not be killed while it relays them.
timeout = 0
graceful_timeout = 30
keepalive = 75
accesslog = None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
