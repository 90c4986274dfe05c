"""The task that runs beside vLLM on a cluster node: one gateway request in, one result (or stream) out.

`inference` is registered with Globus Compute, which ships functions to the endpoint *by value*. The SDK's
default code strategy (DillCode) pickles a function defined in an importable module *by reference*
(module path + name), and this package is not installed on endpoints, so the gateway registers it with a
source strategy (`compute_functions.CODE_STRATEGY`): only this function's source text travels and is
`exec`-ed alone on the endpoint. Hence everything it needs lives inside its body: the standard-library
imports, nested helpers, and annotations that evaluate with builtins only (Python >= 3.10).

The request, results and relay messages are plain JSON; their shapes are documented on `inference`.
"""

from typing import Any


def inference(request: "dict[str, Any]") -> "dict[str, Any]":
    """Run one gateway task against vLLM and return the outcome as data; upstream failures never raise.

    request:
        mode      "inference" (default) or "health"
        route     a key of `routes` below ("chat/completions", "responses", "messages", ...)
        body      the OpenAI request body, sent to vLLM as JSON; for the audio routes (`form_routes`) the
                  client's multipart form: {"content_type": its Content-Type, "data": the form, base64}
        request_id   optional, forwarded as X-Request-Id
        vllm      {host, port, tls=False, verify_tls=True, api_key_env=None, connect_timeout=5, read_timeout=600}
        stream    optional {relay_url, token, max_coalesce_ms=5, retries=5, verify_tls=True, timeout=30}

    Non-streamed result: {"status": <vLLM's status>, "body": <JSON or text>, "elapsed_ms"}; when vLLM
    cannot answer: {"status": 503|504|502|500, "error": {"code", "message"}, "elapsed_ms"} (code
    `vllm_restarting` while the node's supervisor restarts a vLLM that died).
    Health result: {"status": 200|503, "healthy", "models": [ids], "cards": [vLLM's model cards],
    "elapsed_ms", "error"?}.
    Streamed: each batch of SSE events is POSTed to relay_url as {"seq", "attempt", "events": [...]}, then
    {"seq", "attempt", "done": true} or {"seq", "attempt", "error": {"status", "code", "message", "body"?}}
    (`body`: vLLM's own error body when it refused the request). `attempt` is random per run of the function:
    if Globus Compute runs the task again (a lost worker, with max_retries_on_system_failure), the gateway
    keeps the attempt that delivered first and answers the other 403, which stops it. The result is a summary
    {"status", "outcome": completed|failed|cancelled|relay_failed, "chunks", "events", "usage",
    "elapsed_ms", "error"?}.
    """
    import base64
    import contextlib
    import http.client
    import json
    import os
    import queue
    import secrets
    import socket
    import ssl
    import threading
    import time
    import urllib.parse
    import urllib.request

    # The gateway's route -> its path on vLLM. The route becomes part of the URL, so only these are served.
    routes = {
        "chat/completions": "/v1/chat/completions",
        "completions": "/v1/completions",
        "embeddings": "/v1/embeddings",
        "responses": "/v1/responses",
        "messages": "/v1/messages",
        "messages/count_tokens": "/v1/messages/count_tokens",
        "tokenize": "/tokenize",
        "detokenize": "/detokenize",
        "score": "/v1/score",
        "rerank": "/v1/rerank",
        "pooling": "/pooling",
        "classify": "/classify",
        "audio/transcriptions": "/v1/audio/transcriptions",
        "audio/translations": "/v1/audio/translations",
    }
    # Routes whose body is a multipart form, sent to vLLM as the client sent it.
    form_routes = ("audio/transcriptions", "audio/translations")
    # Streams that end with `data: [DONE]`; the others (Responses, Anthropic Messages) end with a named event.
    done_terminated = ("chat/completions", "completions", *form_routes)
    started = time.monotonic()
    end_of_stream = object()  # the reader's marker for a cleanly closed upstream response

    class TaskError(Exception):
        """A failure reported as data: the status the gateway should answer and a stable code."""

        def __init__(self, status: int, code: str, message: str, body: object = None) -> None:
            super().__init__(message)
            self.status = status
            self.code = code
            self.message = message
            self.body = body  # vLLM's own error body, passed on with `vllm_rejected`

        def as_dict(self) -> dict[str, Any]:
            error = {"status": self.status, "code": self.code, "message": self.message}
            return error if self.body is None else {**error, "body": self.body}

    class RelayGone(Exception):
        """The gateway answered 403/404: the client left, the task token expired, or another attempt of the task
        owns the stream."""

    class RelayFailed(Exception):
        """The relay kept failing (or refused the message) after all retries."""

    def elapsed_ms() -> float:
        return round((time.monotonic() - started) * 1000, 1)

    def tls_context(verify: bool) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if not verify:
            # For a site's self-signed certificate in front of vLLM; the admin opts out explicitly.
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def vllm_settings(raw: object) -> dict[str, Any]:
        if not isinstance(raw, dict) or not raw.get("host") or not raw.get("port"):
            raise TaskError(500, "invalid_task", "The task has no vllm.host and vllm.port.")
        headers = {"Content-Type": "application/json"}
        if raw.get("api_key_env"):
            key = os.environ.get(raw["api_key_env"])
            if not key:
                message = f"The endpoint's environment has no {raw['api_key_env']} for vLLM's API key."
                raise TaskError(500, "vllm_api_key_missing", message)
            headers["Authorization"] = f"Bearer {key}"
        if request.get("request_id"):
            headers["X-Request-Id"] = str(request["request_id"])
        return {
            "host": str(raw["host"]),
            "port": int(raw["port"]),
            "tls": bool(raw.get("tls", False)),
            "verify_tls": bool(raw.get("verify_tls", True)),
            "connect_timeout": float(raw.get("connect_timeout") or 5),
            "read_timeout": float(raw.get("read_timeout") or 600),
            "headers": headers,
        }

    def vllm_down(host: str, port: int, exc: OSError) -> TaskError:
        """vLLM refused the connection. On this node, endpoint_configs/launch_vllm.sh's supervisor keeps its
        state in $VLLM_LOG_DIR/vllm-PORT.state: say when it is restarting vLLM, or has given up."""
        unreachable = f"vLLM at {host}:{port} is unreachable: {exc}"
        state: object = None
        log_dir = os.environ.get("VLLM_LOG_DIR")
        if host in ("127.0.0.1", "localhost", "::1") and log_dir:
            state_file = os.path.join(log_dir, f"vllm-{port}.state")
            with contextlib.suppress(OSError, ValueError), open(state_file) as file:
                state = json.load(file)
        if not isinstance(state, dict):
            return TaskError(503, "vllm_unreachable", unreachable)
        if state.get("state") == "restarting":
            with contextlib.suppress(TypeError, ValueError):
                # Numbers only: the gateway shows this message to the caller.
                attempt, attempts = int(state["attempt"]), int(state["max_attempts"])
                message = f"The model server on the node stopped and is restarting (attempt {attempt} of {attempts})."
                return TaskError(503, "vllm_restarting", message)
        if state.get("state") == "failed":
            return TaskError(503, "vllm_unreachable", f"{unreachable}; its supervisor gave up: {state.get('detail')}")
        return TaskError(503, "vllm_unreachable", unreachable)

    def connect(vllm: dict[str, Any]) -> http.client.HTTPConnection:
        host, port, timeout = vllm["host"], vllm["port"], vllm["connect_timeout"]
        if vllm["tls"]:
            context = tls_context(vllm["verify_tls"])
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.connect()
        except OSError as exc:
            conn.close()
            raise vllm_down(host, port, exc) from None
        conn.sock.settimeout(vllm["read_timeout"])  # connected: from now on, waits are read waits
        return conn

    def upstream_failure(exc: Exception, vllm: dict[str, Any]) -> TaskError:
        if isinstance(exc, TimeoutError):
            return TaskError(504, "vllm_timeout", f"vLLM sent nothing for {vllm['read_timeout']:g} s.")
        return TaskError(502, "vllm_connection_lost", f"The connection to vLLM failed: {exc!r}")

    def call(
        vllm: dict[str, Any], method: str, path: str, body: object = None, route: str = ""
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send one request (JSON, or the form of a `form_routes` route); the caller reads the response and
        closes the connection."""
        conn = connect(vllm)
        headers = vllm["headers"]
        if route in form_routes and isinstance(body, dict):
            payload: bytes | None = base64.b64decode(body["data"])
            headers = {**headers, "Content-Type": body["content_type"]}
        else:
            payload = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        try:
            conn.request(method, path, body=payload, headers=headers)
            return conn, conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise upstream_failure(exc, vllm) from None

    def fetch(vllm: dict[str, Any], method: str, path: str, body: object = None, route: str = "") -> tuple[int, bytes]:
        conn, response = call(vllm, method, path, body, route)
        try:
            return response.status, response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise upstream_failure(exc, vllm) from None
        finally:
            conn.close()

    def decode(raw: bytes) -> Any:
        text = raw.decode("utf-8", errors="replace")
        try:
            return json.loads(text)
        except ValueError:
            return text

    def error_message(raw: bytes) -> str:
        """The message of vLLM's error envelope (or FastAPI's detail), else the raw text."""
        body = decode(raw)
        if isinstance(body, dict):
            error = body.get("error")
            if isinstance(error, dict) and isinstance(error.get("message"), str):
                return str(error["message"])
            for key in ("message", "detail", "error"):
                if isinstance(body.get(key), str):
                    return str(body[key])
        return str(body)[:2000]

    def run_plain(vllm: dict[str, Any], route: str, body: object) -> dict[str, Any]:
        status, raw = fetch(vllm, "POST", routes[route], body, route)
        return {"status": status, "body": decode(raw), "elapsed_ms": elapsed_ms()}

    def run_health(vllm: dict[str, Any]) -> dict[str, Any]:
        try:
            health_status, _ = fetch(vllm, "GET", "/health")
            models_status, raw = fetch(vllm, "GET", "/v1/models")
            if health_status != 200 or models_status != 200:
                detail = f"/health answered HTTP {health_status}, /v1/models HTTP {models_status}."
                raise TaskError(503, "vllm_unhealthy", detail)
            listing = decode(raw)
            data = listing.get("data") if isinstance(listing, dict) else None
            cards = [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []
        except TaskError as error:
            return {"status": 503, "healthy": False, "models": [], "elapsed_ms": elapsed_ms(), "error": error.as_dict()}
        models = [card.get("id") for card in cards]
        return {"status": 200, "healthy": True, "models": models, "cards": cards, "elapsed_ms": elapsed_ms()}

    def proxy_for(url: urllib.parse.SplitResult) -> urllib.parse.SplitResult | None:
        """The site proxy for `url` from the node's environment (http(s)_proxy, no_proxy), if any.

        Compute nodes often reach the gateway only through one, and http.client ignores these variables.
        """
        proxy = urllib.request.getproxies().get(url.scheme)
        host = str(url.hostname)
        if not proxy or host in ("localhost", "127.0.0.1", "::1") or urllib.request.proxy_bypass(host):
            return None
        return urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")

    class Relay:
        """POSTs stream messages to the gateway over one kept-alive connection, numbering them from 0."""

        transient = frozenset({429, 500, 502, 503, 504})

        def __init__(self, settings: object) -> None:
            if not isinstance(settings, dict) or not settings.get("token"):
                raise TaskError(500, "invalid_task", "The task's stream settings need relay_url and token.")
            url = urllib.parse.urlsplit(str(settings.get("relay_url", "")))
            if url.scheme not in ("http", "https") or not url.hostname:
                raise TaskError(500, "invalid_task", "The task's relay_url is not an http(s) URL.")
            self.url = url
            self.proxy = proxy_for(url)
            # Through a plain-HTTP proxy, the request line carries the absolute URL.
            target = (url.path or "/") + (f"?{url.query}" if url.query else "")
            self.path = url.geturl() if self.proxy is not None and url.scheme == "http" else target
            self.headers = {"Authorization": f"Bearer {settings['token']}", "Content-Type": "application/json"}
            self.retries = int(settings.get("retries", 5))
            self.timeout = float(settings.get("timeout", 30))
            self.verify_tls = bool(settings.get("verify_tls", True))
            self.seq = 0
            self.attempt = secrets.token_hex(8)  # this run of the task (a retried run gets another)
            self.conn: http.client.HTTPConnection | None = None

        def send(self, message: dict[str, Any]) -> None:
            """Deliver one message, retrying transient failures with exponential backoff.

            A retried POST may have reached the gateway already; it drops the duplicate by `seq`.
            """
            payload = json.dumps({"seq": self.seq, "attempt": self.attempt, **message}, separators=(",", ":")).encode()
            last = "not sent"
            for attempt in range(self.retries + 1):
                if attempt:
                    time.sleep(min(0.1 * 2 ** (attempt - 1), 5.0))
                status = self.post(payload)
                if status is not None and status < 300:
                    self.seq += 1
                    return
                if status in (403, 404):
                    raise RelayGone()
                if status is not None and status not in self.transient:
                    raise RelayFailed(f"the relay answered HTTP {status}")
                last = "no connection" if status is None else f"HTTP {status}"
            raise RelayFailed(f"the relay failed {self.retries + 1} times (last: {last})")

        def post(self, payload: bytes) -> int | None:
            """One attempt: the relay's status, or None when the connection failed."""
            try:
                conn = self.conn or self.open()
                conn.request("POST", self.path, body=payload, headers=self.headers)
                response = conn.getresponse()
                response.read()  # drain, so the connection can carry the next POST
            except (OSError, http.client.HTTPException):
                self.close()  # a kept-alive connection may have been closed by the gateway: reconnect
                return None
            if response.will_close:
                self.close()
            return response.status

        def open(self) -> http.client.HTTPConnection:
            host, port = str(self.url.hostname), self.url.port
            if self.proxy is not None:
                host, port = str(self.proxy.hostname), self.proxy.port or 80
            conn: http.client.HTTPConnection
            if self.url.scheme == "https":
                context = tls_context(self.verify_tls)
                conn = http.client.HTTPSConnection(host, port, timeout=self.timeout, context=context)
                if self.proxy is not None:
                    conn.set_tunnel(str(self.url.hostname), self.url.port)  # CONNECT, then TLS to the gateway
            else:
                conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
            self.conn = conn
            return conn

        def close(self) -> None:
            if self.conn is not None:
                self.conn.close()
                self.conn = None

    def split_events(buffer: bytes) -> tuple[list[bytes], bytes]:
        """Complete SSE events (each ending in a blank line) and the incomplete rest."""
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        *events, rest = buffer.split(b"\n\n")
        return [event + b"\n\n" for event in events if event], rest

    def pump(response: http.client.HTTPResponse, vllm: dict[str, Any], out: queue.SimpleQueue[Any]) -> None:
        """Reader thread: queue each complete event as it arrives, then the end marker or a TaskError.

        Reading in its own thread lets vLLM's stream flow while the main thread waits on the relay.
        """
        rest = b""
        ending: object = end_of_stream
        try:
            while data := response.read1(65536):
                events, rest = split_events(rest + data)
                for event in events:
                    out.put(event.decode("utf-8", errors="replace"))
        except (OSError, ValueError, http.client.HTTPException) as exc:
            # http.client reports a cut chunked stream as IncompleteRead, sometimes as ValueError.
            ending = upstream_failure(exc, vllm)
            if ending.code == "vllm_connection_lost":
                ending = TaskError(502, "vllm_stream_broken", f"vLLM's stream broke: {exc!r}")
        finally:
            out.put(ending)  # always, so that the main thread never waits forever

    def collect(inbox: queue.SimpleQueue[Any], window: float) -> tuple[list[str], object]:
        """Wait for the next event, then add what else arrives within `window` s (never a fixed count).

        Returns the events and what ended the batch: None (window over), the end marker or a TaskError.
        """
        batch: list[str] = []
        item = inbox.get()
        deadline = time.monotonic() + window
        while isinstance(item, str):
            batch.append(item)
            remaining = deadline - time.monotonic()
            try:
                item = inbox.get(timeout=remaining) if remaining > 0 else inbox.get_nowait()
            except queue.Empty:
                return batch, None
        return batch, item

    def usage_of(event: str) -> dict[str, Any] | None:
        """The usage object of an event: vLLM's final usage chunk, or with `continuous_usage_stats` (the gateway
        asks for it, to meter streams cut short) any chunk."""
        if '"usage"' not in event or not event.startswith("data: {"):
            return None
        try:
            usage = json.loads(event[6:]).get("usage")
        except ValueError:
            return None
        return usage if isinstance(usage, dict) else None

    def relay_events(
        inbox: queue.SimpleQueue[Any], relay: Relay, window: float, summary: dict[str, Any], route: str
    ) -> TaskError | None:
        """Forward batches until vLLM's stream ends; the failure to report, if any."""
        saw_done = route not in done_terminated  # the gateway checks those streams' final event itself
        while True:
            batch, ended_by = collect(inbox, window)
            if batch:
                relay.send({"events": batch})
                summary["chunks"] += 1
                summary["events"] += len(batch)
                saw_done = saw_done or any(event.startswith("data: [DONE]") for event in batch)
                # The latest usage in the batch is all the summary keeps: look from the end.
                summary["usage"] = next(filter(None, map(usage_of, reversed(batch))), summary["usage"])
            if isinstance(ended_by, TaskError):
                return ended_by
            if ended_by is end_of_stream:
                if saw_done:
                    return None
                return TaskError(502, "vllm_stream_broken", "vLLM ended the stream without [DONE].")

    def stream_upstream(
        vllm: dict[str, Any], route: str, body: dict[str, Any], relay: Relay, window: float, summary: dict[str, Any]
    ) -> None:
        # A form says `stream` itself; the gateway streams a JSON body only when its `stream` is on.
        conn, response = call(
            vllm, "POST", routes[route], body if route in form_routes else {**body, "stream": True}, route
        )
        if response.status >= 300:
            try:
                raw = response.read()
            except (OSError, http.client.HTTPException):
                raw = b""
            conn.close()
            message = error_message(raw) if raw else ""
            refusal = decode(raw) if raw else None
            raise TaskError(
                response.status,
                "vllm_rejected",
                message or f"vLLM answered HTTP {response.status}.",
                refusal if isinstance(refusal, dict) else None,
            )
        inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        reader = threading.Thread(target=pump, args=(response, vllm, inbox), daemon=True)
        reader.start()
        try:
            failure = relay_events(inbox, relay, window, summary, route)
        finally:
            # Shutting the socket down wakes the reader and tells vLLM to stop generating.
            if conn.sock is not None and reader.is_alive():
                with contextlib.suppress(OSError):  # the reader may have just finished
                    conn.sock.shutdown(socket.SHUT_RDWR)
            reader.join(timeout=5)
            conn.close()
        if failure is not None:
            raise failure

    def task_route() -> tuple[str, dict[str, Any]]:
        route, body = request.get("route"), request.get("body")
        if route not in routes or not isinstance(body, dict):
            # Checked before use: the route becomes part of the URL path on the node.
            raise TaskError(500, "invalid_task", f"Unknown route {route!r} or a body that is not an object.")
        if route in form_routes:
            content_type, data = body.get("content_type"), body.get("data")
            # Checked before use: the content type becomes a header line.
            if not isinstance(content_type, str) or not isinstance(data, str) or not content_type.isprintable():
                raise TaskError(500, "invalid_task", "A form route's body needs content_type and data strings.")
        return route, body

    def run_stream(relay: Relay, window: float) -> dict[str, Any]:
        summary: dict[str, Any] = {"status": 200, "outcome": "completed", "chunks": 0, "events": 0, "usage": None}
        try:
            try:
                route, body = task_route()
                stream_upstream(vllm_settings(request.get("vllm")), route, body, relay, window, summary)
                relay.send({"done": True})
            except TaskError as failure:
                # The gateway is waiting on the relay, so every failure is reported there too.
                summary.update(status=failure.status, outcome="failed", error=failure.as_dict())
                relay.send({"error": failure.as_dict()})
        except RelayGone:
            summary["outcome"] = "cancelled"
        except RelayFailed as exc:
            error = {"status": 502, "code": "relay_failed", "message": str(exc)}
            summary.update(status=502, outcome="relay_failed", error=error)
        finally:
            relay.close()
        return {**summary, "elapsed_ms": elapsed_ms()}

    def run() -> dict[str, Any]:
        mode = request.get("mode", "inference")
        if mode == "health":
            return run_health(vllm_settings(request.get("vllm")))
        if mode != "inference":
            raise TaskError(500, "invalid_task", f"Unknown mode {mode!r}.")
        stream = request.get("stream")
        if stream:
            relay = Relay(stream)
            window = max(float(stream.get("max_coalesce_ms", 5)), 0.0) / 1000
            return run_stream(relay, window)
        route, body = task_route()
        return run_plain(vllm_settings(request.get("vllm")), route, body)

    try:
        return run()
    except TaskError as error:
        failure = {"code": error.code, "message": error.message}
        return {"status": error.status, "error": failure, "elapsed_ms": elapsed_ms()}
