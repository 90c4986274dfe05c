"""Django settings, derived from the typed `GatewaySettings` read from the environment."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import dj_database_url
import django_stubs_ext

from gateway.config import GatewaySettings

# Lets classes such as admin.ModelAdmin[Model] be subscripted at run time, as the type stubs describe them.
django_stubs_ext.monkeypatch()

GATEWAY = GatewaySettings()
GATEWAY.check_production_safety()
GATEWAY.check_globus()

SECRET_KEY = GATEWAY.SECRET_KEY or GATEWAY.development_secret_key()
DEBUG = GATEWAY.DEBUG
ALLOWED_HOSTS = GATEWAY.ALLOWED_HOSTS
CSRF_TRUSTED_ORIGINS = GATEWAY.CSRF_TRUSTED_ORIGINS

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "ninja",
    "axes",
    "resource_server",
]

MIDDLEWARE = [
    "resource_server.middleware.RequestContextMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "gateway.urls"
ASGI_APPLICATION = "gateway.asgi.application"
WSGI_APPLICATION = "gateway.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


# WAL: readers and the usage writer do not block each other; IMMEDIATE: writers queue, never deadlock, and the
# database limit store's check-and-reserve holds the write lock from its first read (with the default DEFERRED, a
# read-then-write transaction that another worker's write overtook failed at once: "database is locked").
# synchronous=NORMAL, SQLite's advice for WAL: a commit survives the process crashing, and only a power loss may
# undo the last ones; FULL flushed the disk at each commit (3-6 ms here), twice per limited request. Usage rows
# are journaled with their own fsync before they are inserted, so they survive either way.
_SQLITE_OPTIONS = {
    "timeout": 20,
    "transaction_mode": "IMMEDIATE",
    "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
}


def _database() -> dict[str, Any]:
    if GATEWAY.DATABASE_URL:
        config: dict[str, Any] = dict(
            dj_database_url.parse(GATEWAY.DATABASE_URL, conn_max_age=60, conn_health_checks=True)
        )
        if config["ENGINE"].endswith("sqlite3"):
            # A SQLite file named by URL (the end-to-end tests' gateways, or an operator's) runs as the default one.
            config["OPTIONS"] = {**_SQLITE_OPTIONS, **config.get("OPTIONS", {})}
        if config["ENGINE"].endswith("postgresql"):
            # libpq's own limits (options in DATABASE_URL win): without them a database host that stops
            # answering holds a worker's queries until TCP gives up, minutes to hours later (keepalives
            # start after 2 h idle by default). See docs/admin-guide.md, "Database outages".
            config["OPTIONS"] = {
                "connect_timeout": 5,
                "keepalives_idle": 30,
                "keepalives_interval": 10,
                "keepalives_count": 3,
                "tcp_user_timeout": 30_000,  # ms: unacknowledged data this long ends the connection
                **config.get("OPTIONS", {}),
            }
        return config
    GATEWAY.DATA_DIR.mkdir(parents=True, exist_ok=True)
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": GATEWAY.DATA_DIR / "gateway.sqlite3",
        # A file, not memory, so that end-to-end tests' server processes share the test database.
        "TEST": {"NAME": GATEWAY.DATA_DIR / "test.sqlite3"},
        "OPTIONS": _SQLITE_OPTIONS,
    }


DATABASES = {"default": _database()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

if GATEWAY.REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": GATEWAY.REDIS_URL,
            "KEY_PREFIX": "gateway",
            # redis-py waits for ever by default: a Redis that stops answering would hold the status board's
            # rounds (and admin sign-ins) instead of failing them over to each worker's own view.
            "OPTIONS": {
                "socket_timeout": GATEWAY.RELAY_REDIS_TIMEOUT_SECONDS,
                "socket_connect_timeout": GATEWAY.RELAY_REDIS_TIMEOUT_SECONDS,
            },
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# Admin sign-in throttle (django-axes). Its backend refuses a locked-out client before the password is
# checked; the admin's login form says so (resource_server/admin.py). No AxesMiddleware: the form shows the
# lockout, so MIDDLEWARE stays what the lean inference path reproduces (resource_server/api/fast.py).
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
# Counted in the default cache: Redis when REDIS_URL is set, so every worker and host agrees.
AXES_HANDLER = "axes.handlers.cache.AxesCacheHandler"
AXES_CACHE = "default"
# Either counter locks: one address trying many usernames, or many addresses trying one username. Both are
# counted whether or not the username exists, so a lockout says nothing about which accounts exist.
AXES_LOCKOUT_PARAMETERS = ["ip_address", "username"]
AXES_FAILURE_LIMIT = GATEWAY.ADMIN_LOGIN_FAILURE_LIMIT
AXES_COOLOFF_TIME = timedelta(seconds=GATEWAY.ADMIN_LOGIN_LOCKOUT_SECONDS)
AXES_RESET_ON_SUCCESS = True
# Attempts during a lockout do not extend it: an attacker cannot keep an admin's username locked for ever
# by retrying, only for ADMIN_LOGIN_LOCKOUT_SECONDS after each ADMIN_LOGIN_FAILURE_LIMIT failures.
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
# The client address is REMOTE_ADDR, which the server sets from X-Forwarded-For only for a trusted proxy
# (gunicorn's FORWARDED_ALLOW_IPS, default loopback): a client cannot pick its own address.
AXES_CLIENT_IP_CALLABLE = "resource_server.admin.login_client_address"
# The cache handler keeps nothing in axes' tables: their admin pages would always be empty.
AXES_ENABLE_ADMIN = False
SILENCED_SYSTEM_CHECKS = ["axes.W002"]  # AxesMiddleware: see above
if not GATEWAY.REDIS_URL:
    # In-process counting is the embedded default (one worker); docs/admin-guide.md says what Redis adds.
    SILENCED_SYSTEM_CHECKS.append("axes.W001")

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = GATEWAY.DATA_DIR / "static"

if GATEWAY.is_production:
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_CONTENT_TYPE_NOSNIFF = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": GATEWAY.LOG_LEVEL},
    "loggers": {
        "django.request": {"level": "ERROR"},
        # httpx logs every upstream request at INFO: one line per inference is noise, not signal.
        "httpx": {"level": "WARNING"},
        # pika (the Globus Compute SDK's result watcher) logs every AMQP connection step at INFO.
        "pika": {"level": "WARNING"},
    },
}
DATA_UPLOAD_MAX_MEMORY_SIZE = GATEWAY.MAX_REQUEST_BYTES
