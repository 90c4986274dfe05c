"""The gateway's settings: one typed object read from the environment (see `.env.example`)."""

from __future__ import annotations

import os
import secrets
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

BASE_DIR = Path(__file__).resolve().parent.parent


class Environment(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


CsvList = Annotated[list[str], NoDecode]
_CSV_FIELDS = (
    "ALLOWED_HOSTS",
    "CSRF_TRUSTED_ORIGINS",
    "GLOBUS_ALLOWED_DOMAINS",
    "GLOBUS_POLICIES",
    "GLOBUS_REQUIRED_GROUPS",
    "GLOBUS_SERVICE_CLIENTS",
)


# The URL schemes dj-database-url maps to Django's PostgreSQL backend.
_POSTGRES_SCHEMES = frozenset({"postgres", "postgresql", "pgsql"})


class UnsafeSettingsError(RuntimeError):
    """Production was asked to boot with a value that is unsafe there."""


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=True)

    GATEWAY_ENV: Environment = Environment.DEVELOPMENT
    SECRET_KEY: str = ""
    DEBUG: bool = False
    ALLOWED_HOSTS: CsvList = Field(default_factory=lambda: ["127.0.0.1", "localhost", "[::1]"])
    CSRF_TRUSTED_ORIGINS: CsvList = Field(default_factory=list)
    DATABASE_URL: str = ""
    REDIS_URL: str = ""
    DATA_DIR: Path = BASE_DIR / "var"
    LOG_LEVEL: str = "INFO"

    # Request logging: bodies are personal data, so they are kept only when an admin opts in.
    LOG_REQUEST_BODIES: bool = False
    USAGE_BATCH_SIZE: int = Field(default=200, ge=1, le=10_000)
    # Also how often the usage journal is synced to disk: a power cut loses at most this much of them
    # (a SIGKILL only the last 10 ms: records reach the journal file that fast).
    USAGE_FLUSH_SECONDS: float = Field(default=0.5, gt=0, le=60)
    # Raw usage rows (RequestLog) older than this many days are deleted by `manage.py prune_usage`; the daily
    # rollup (UsageDaily) that reports and budgets read keeps their totals for good. 0: keep them forever.
    USAGE_RETENTION_DAYS: int = Field(default=400, ge=0, le=36_500)

    # How long a worker trusts what it read from the database before reading it again.
    ROUTING_CACHE_SECONDS: float = Field(default=5.0, ge=0)
    API_KEY_CACHE_SECONDS: float = Field(default=30.0, ge=0)
    # How often each worker checks every enabled endpoint's backend in the background (direct: GET /v1/models;
    # globus_compute: the endpoint's status; local: a health task). Endpoints found down are tried after the
    # others when a model has several; 0 turns the checks off.
    HEALTH_PROBE_SECONDS: float = Field(default=30.0, ge=0)
    # A live endpoint whose batch job ends within this many seconds (its walltime) is `draining`: it still
    # answers, but the route stage prefers another, and a new job should be on its way.
    STATUS_DRAIN_SECONDS: float = Field(default=600.0, ge=0, le=86400)
    # Routing across clusters (docs/user-guide.md, "Routing and cold models"). Before the first byte reaches the
    # client, a connect failure, a 503 or an endpoint found offline moves a request to the model's next
    # endpoint; at most this many endpoints are tried for one request.
    ROUTE_MAX_TRIES: int = Field(default=3, ge=1, le=20)
    # With REDIS_URL: how often each worker publishes its requests in flight per endpoint and reads the other
    # workers' (the route stage prefers the least loaded endpoint, reading that snapshot, never Redis itself).
    # A worker's counts are dropped 3 periods after its last publication (a crashed worker). 0: every worker
    # counts only its own requests.
    ROUTE_LOAD_SHARE_SECONDS: float = Field(default=1.0, ge=0, le=60)
    # X-Gateway-Max-Wait: the longest a client may ask the gateway to hold a request for a cold model.
    MAX_WAIT_SECONDS: float = Field(default=900.0, ge=0, le=86400)
    # How often a held request looks at its endpoints' states again besides each change, and how often a held
    # stream gets a progress comment (`: status=queued position=3 eta=240`).
    MAX_WAIT_PROGRESS_SECONDS: float = Field(default=5.0, gt=0, le=300)
    # Limits and budgets (docs/admin-guide.md, "Limits, budgets and allocations"). When the limits store (Redis,
    # or the database without REDIS_URL) cannot be reached, a request under a budget is refused with 503
    # (closed) or let through unmetered (open), and likewise a request under rate or concurrency limits.
    LIMITS_BUDGETS_WHEN_STORE_DOWN: Literal["closed", "open"] = "closed"
    LIMITS_RATES_WHEN_STORE_DOWN: Literal["closed", "open"] = "open"
    # What token limits reserve for a request without max_tokens on an endpoint whose context length is not set.
    LIMITS_DEFAULT_CONTEXT_TOKENS: int = Field(default=32768, ge=1)
    # How long a worker remembers that a key was refused (unknown, wrong secret, revoked, expired, owner
    # disabled), so a client retrying a bad key costs no query. New keys are never in it: nobody can
    # present a key before it exists.
    API_KEY_NEGATIVE_CACHE_SECONDS: float = Field(default=10.0, ge=0, le=3600)
    # While the database (or Globus Groups) cannot be reached, credentials a worker checked within this
    # many seconds keep working (docs/admin-guide.md, "Database outages"); 0: refuse them with 503.
    AUTH_OUTAGE_GRACE_SECONDS: float = Field(default=3600.0, ge=0, le=86400)

    # Largest request body accepted on the inference routes.
    MAX_REQUEST_BYTES: int = Field(default=8 * 1024 * 1024, ge=1024)
    # Largest audio upload (the multipart body of /v1/audio/transcriptions and /translations), as OpenAI's 25 MB.
    # Uploads stream through to the model server and are never held whole in memory (a form whose `model`
    # comes after the file is spooled to a temporary file first); through Globus Compute the limit is lower.
    AUDIO_MAX_BYTES: int = Field(default=25 * 1024 * 1024, ge=1024)
    # Overload: a worker answers a new inference request 503 + Retry-After at once, rather than take it,
    # while it already holds MAX_PENDING_PER_WORKER requests not yet answered (a stream counts until its
    # response starts), or MAX_IN_FLIGHT_PER_WORKER requests of any kind (open streams included). So a
    # closed loop of up to MAX_PENDING_PER_WORKER clients per worker is queued and served, never refused;
    # above it a worker sheds instead of queueing without bound. Requests waiting for a slow model count
    # too: raise it where models answer non-streamed requests slowly and many wait at once. 256 is what
    # one vLLM engine batches by default (max_num_seqs), and leaves a saturated worker's time mostly to
    # refusing the excess at once (a refusal costs half the CPU of an answer) rather than to a long queue.
    MAX_PENDING_PER_WORKER: int = Field(default=256, ge=1, le=100_000)
    MAX_IN_FLIGHT_PER_WORKER: int = Field(default=2048, ge=1, le=100_000)

    # The gateway's own HTTP server (gunicorn's uvicorn worker, gateway/worker.py), for clients that
    # reach it without nginx: a request's line and headers may take at most MAX_HEADER_BYTES (more gets
    # 431 and the connection closed), and must arrive within HEADER_TIMEOUT_SECONDS of the connection
    # opening or the request's first byte (else the connection is closed, with 408 if a request began).
    MAX_HEADER_BYTES: int = Field(default=64 * 1024, ge=8 * 1024, le=1024 * 1024)
    HEADER_TIMEOUT_SECONDS: float = Field(default=10.0, gt=0, le=300)

    # Admin sign-in throttle (docs/admin-guide.md): after this many failed sign-ins from one client address,
    # or for one username, that address or username is refused for ADMIN_LOGIN_LOCKOUT_SECONDS.
    ADMIN_LOGIN_FAILURE_LIMIT: int = Field(default=5, ge=1, le=1000)
    ADMIN_LOGIN_LOCKOUT_SECONDS: int = Field(default=900, ge=1, le=86400)

    # Globus Auth (docs/globus-auth.md). Without GLOBUS_CLIENT_ID only gateway API keys are accepted.
    GLOBUS_CLIENT_ID: str = ""
    GLOBUS_CLIENT_SECRET: SecretStr = SecretStr("")
    GLOBUS_SCOPE: str = ""
    GLOBUS_ALLOWED_DOMAINS: CsvList = Field(default_factory=list)
    GLOBUS_POLICIES: CsvList = Field(default_factory=list)
    GLOBUS_REQUIRED_GROUPS: CsvList = Field(default_factory=list)
    GLOBUS_SERVICE_CLIENTS: CsvList = Field(default_factory=list)
    GLOBUS_TOKEN_CACHE_SECONDS: float = Field(default=60.0, ge=0, le=3600)
    GLOBUS_GROUPS_CACHE_SECONDS: float = Field(default=300.0, ge=0, le=86400)
    GLOBUS_TIMEOUT_SECONDS: float = Field(default=10.0, gt=0, le=120)

    # Globus Compute (docs/add-a-model.md): the service account that registers the compute functions and
    # submits tasks. Endpoints may override it with their own client in their backend config.
    GLOBUS_COMPUTE_CLIENT_ID: str = ""
    GLOBUS_COMPUTE_CLIENT_SECRET: SecretStr = SecretStr("")
    # How long an endpoint's status (online, workers) is trusted before it is fetched again.
    GLOBUS_COMPUTE_STATUS_CACHE_SECONDS: float = Field(default=30.0, ge=0, le=3600)
    # The SDK Executor's submission pacing (docs/performance.md, "Globus Compute submission"): it sends the
    # tasks waiting in its queue as one batch of at most GLOBUS_COMPUTE_BATCH_SIZE; once it has sent
    # GLOBUS_COMPUTE_API_BURST_LIMIT batches smaller than that limit within GLOBUS_COMPUTE_API_BURST_WINDOW_SECONDS,
    # it sleeps before the next one (up to window/limit, plus up to 1 s at random). The SDK's defaults (128, 4,
    # 16 s) delay every request past the fourth in 16 s; the bounds are the SDK's own (it clamps to them).
    GLOBUS_COMPUTE_BATCH_SIZE: int = Field(default=128, ge=1, le=1024)
    GLOBUS_COMPUTE_API_BURST_LIMIT: int = Field(default=8, ge=1, le=8)
    GLOBUS_COMPUTE_API_BURST_WINDOW_SECONDS: int = Field(default=1, ge=1, le=32)
    # How often the SDK's result watcher hands the results it received to the waiting requests (the SDK's
    # own 0.5 s adds 250 ms to a request on average); a poll costs a few microseconds of a thread.
    GLOBUS_COMPUTE_RESULT_POLL_SECONDS: float = Field(default=0.02, ge=0.005, le=0.5)
    # A task the endpoint lost (an endpoint restart, a lost broker message) never resolves. From this many
    # seconds after submission, a waiting request checks the endpoint's status: if the endpoint went offline,
    # or holds no task at all (its engine's outstanding_tasks is 0) while this one is unanswered, the task is
    # lost: 502 `compute_task_lost` (503 `endpoint_offline`), and the SDK stops watching it. Longer than the
    # endpoint's heartbeat (30 s), whose report the status is, plus a result's way back. 0: wait task_timeout.
    GLOBUS_COMPUTE_LOST_TASK_SECONDS: float = Field(default=60.0, ge=0, le=86400)

    # The stream relay: compute functions on cluster nodes POST each stream's chunks back to the gateway.
    # The base URL they use, e.g. https://gateway.example.org. Empty: streams through compute backends fail.
    RELAY_PUBLIC_URL: str = Field(default="", pattern=r"^(https?://[^\s/?#]+[^\s?#]*)?$")
    # Longest wait for a stream's first chunk: long enough for a node to start and load the model.
    RELAY_FIRST_CHUNK_SECONDS: float = Field(default=900.0, gt=0, le=86400)
    # Longest silence between two chunks before the stream ends with an error event.
    RELAY_IDLE_SECONDS: float = Field(default=120.0, gt=0, le=3600)
    # Lifetime of a task's relay token: no stream runs longer.
    RELAY_MAX_STREAM_SECONDS: float = Field(default=3600.0, gt=0, le=86400)
    RELAY_MAX_MESSAGE_BYTES: int = Field(default=1024 * 1024, ge=1024, le=8 * 1024 * 1024)
    # Messages a stream may have waiting for its client before the relay asks the function to back off.
    RELAY_MAX_PENDING_MESSAGES: int = Field(default=1000, ge=1, le=100_000)
    # Longest wait for Redis (with REDIS_URL) to connect or answer a relay command, and the margin a stream's
    # blocking read allows beyond its block. Past it the stream ends with 503 `relay_unavailable`.
    RELAY_REDIS_TIMEOUT_SECONDS: float = Field(default=2.0, gt=0, le=60)

    # Limits and budgets (docs/admin-guide.md). A request's concurrency slots are leases that its worker renews
    # while the request runs; a crashed worker's slots come back this many seconds after its last renewal.
    LIMITS_RESERVATION_TTL_SECONDS: float = Field(default=60.0, ge=5, le=3600)
    # With REDIS_URL: longest wait for Redis to connect or answer a limit check. The check runs before every
    # limited request, so a slow Redis must fail it fast (the fail-open/closed setting decides what then).
    LIMITS_REDIS_TIMEOUT_SECONDS: float = Field(default=0.5, gt=0, le=10)

    @model_validator(mode="before")
    @classmethod
    def _csv_fields(cls, data: dict[str, object]) -> dict[str, object]:
        for name in _CSV_FIELDS:
            if name in data:
                data[name] = _split_csv(data[name])
        return data

    @property
    def is_production(self) -> bool:
        return self.GATEWAY_ENV is Environment.PRODUCTION

    @property
    def globus_enabled(self) -> bool:
        return bool(self.GLOBUS_CLIENT_ID)

    @property
    def globus_scope(self) -> str:
        """The scope tokens must carry: GLOBUS_SCOPE, or the client's default `action_all` scope."""
        return self.GLOBUS_SCOPE or f"https://auth.globus.org/scopes/{self.GLOBUS_CLIENT_ID}/action_all"

    def check_globus(self) -> None:
        """Refuse a Globus configuration that cannot work, in every environment."""
        if self.globus_enabled and not self.GLOBUS_CLIENT_SECRET.get_secret_value():
            raise UnsafeSettingsError("GLOBUS_CLIENT_SECRET must be set when GLOBUS_CLIENT_ID is.")
        if self.GLOBUS_COMPUTE_CLIENT_ID and not self.GLOBUS_COMPUTE_CLIENT_SECRET.get_secret_value():
            raise UnsafeSettingsError("GLOBUS_COMPUTE_CLIENT_SECRET must be set when GLOBUS_COMPUTE_CLIENT_ID is.")

    def check_production_safety(self) -> None:
        """Refuse to boot production with a default secret, DEBUG on, a wildcard host or a non-PostgreSQL database."""
        if not self.is_production:
            return
        if len(self.SECRET_KEY) < 50 or self.SECRET_KEY.startswith("django-insecure"):
            raise UnsafeSettingsError(
                "SECRET_KEY must be set to a random value of at least 50 characters in production "
                "(python -c 'import secrets; print(secrets.token_urlsafe(64))')."
            )
        if self.DEBUG:
            raise UnsafeSettingsError("DEBUG must be off (DEBUG=false) in production.")
        if not self.ALLOWED_HOSTS or "*" in self.ALLOWED_HOSTS:
            raise UnsafeSettingsError("ALLOWED_HOSTS must list the gateway's host names in production, not '*'.")
        if not self.DATABASE_URL:
            raise UnsafeSettingsError(
                "DATABASE_URL must point at PostgreSQL in production (postgres://user:password@host:5432/name)."
            )
        scheme = self.DATABASE_URL.split("://", 1)[0].lower() if "://" in self.DATABASE_URL else ""
        if scheme not in _POSTGRES_SCHEMES:
            # Only the scheme is echoed: the rest of the URL may hold the database password.
            raise UnsafeSettingsError(
                f"DATABASE_URL must point at PostgreSQL in production (postgres://user:password@host:5432/name), "
                f"not {scheme + '://' if scheme else 'a URL without a scheme'}: usage accounting relies on "
                "PostgreSQL's concurrent writers, and SQLite or other databases are for development only."
            )
        if self.RELAY_PUBLIC_URL and not self.RELAY_PUBLIC_URL.startswith("https://"):
            # Relay tokens travel in these requests' headers.
            raise UnsafeSettingsError("RELAY_PUBLIC_URL must be an https:// URL in production.")

    def development_secret_key(self) -> str:
        """A per-checkout random key for development, kept in DATA_DIR so workers agree on it."""
        path = self.DATA_DIR / "secret_key"
        if not path.exists():
            self.DATA_DIR.mkdir(parents=True, exist_ok=True)
            draft = path.with_name(f"secret_key.{secrets.token_hex(4)}")
            draft.touch(mode=0o600)
            draft.write_text(secrets.token_urlsafe(64))
            try:  # link is atomic and fails if another process won the race: keep theirs
                os.link(draft, path)
            except FileExistsError:
                pass
            finally:
                draft.unlink()
        return path.read_text().strip()
