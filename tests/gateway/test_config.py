import subprocess
import sys

import pytest

from gateway.config import GatewaySettings, UnsafeSettingsError

SAFE = {
    "GATEWAY_ENV": "production",
    "SECRET_KEY": "k" * 64,
    "ALLOWED_HOSTS": "gateway.example.org",
    "DATABASE_URL": "postgres://gw@db/gw",
}


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> GatewaySettings:
    for name in ("GATEWAY_ENV", "SECRET_KEY", "DEBUG", "ALLOWED_HOSTS", "DATABASE_URL", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return GatewaySettings()


def test_safe_production_settings_boot(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from(SAFE, monkeypatch)
    settings.check_production_safety()
    assert settings.ALLOWED_HOSTS == ["gateway.example.org"]


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"SECRET_KEY": ""}, "SECRET_KEY"),
        ({"SECRET_KEY": "django-insecure-" + "x" * 60}, "SECRET_KEY"),
        ({"DEBUG": "true"}, "DEBUG"),
        ({"ALLOWED_HOSTS": "*"}, "ALLOWED_HOSTS"),
        ({"DATABASE_URL": ""}, "DATABASE_URL"),
        ({"DATABASE_URL": "sqlite:///srv/gateway/db.sqlite3"}, "DATABASE_URL must point at PostgreSQL.*sqlite://"),
        ({"DATABASE_URL": "mysql://gw:pw@db/gw"}, "DATABASE_URL must point at PostgreSQL.*mysql://"),
        ({"DATABASE_URL": "/srv/gateway/db.sqlite3"}, "DATABASE_URL must point at PostgreSQL"),
    ],
)
def test_production_refuses_unsafe_values_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, override: dict[str, str], named: str
) -> None:
    settings = settings_from({**SAFE, **override}, monkeypatch)
    with pytest.raises(UnsafeSettingsError, match=named):
        settings.check_production_safety()


@pytest.mark.parametrize("url", ["postgres://gw@db/gw", "postgresql://gw:pw@db:5432/gw", "PGSQL://gw@db/gw"])
def test_production_accepts_every_postgres_url_scheme(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    settings_from({**SAFE, "DATABASE_URL": url}, monkeypatch).check_production_safety()


def test_refused_database_url_does_not_echo_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from({**SAFE, "DATABASE_URL": "mysql://gw:hunter2-secret@db/gw"}, monkeypatch)
    with pytest.raises(UnsafeSettingsError) as refused:
        settings.check_production_safety()
    assert "hunter2" not in str(refused.value)


def test_production_process_refuses_to_boot_on_sqlite(tmp_path) -> None:
    env = {
        **SAFE,
        "DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3",
        "DATA_DIR": str(tmp_path),
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run([sys.executable, "manage.py", "check"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DATABASE_URL must point at PostgreSQL" in result.stderr


def test_development_defaults_to_sqlite_and_local_cache(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    settings = settings_from({"DATA_DIR": str(tmp_path)}, monkeypatch)
    settings.check_production_safety()
    assert not settings.is_production
    key = settings.development_secret_key()
    assert len(key) > 50
    assert settings.development_secret_key() == key, "workers must agree on the development key"


def test_production_process_refuses_to_boot_with_debug_on(tmp_path) -> None:
    env = {**SAFE, "DEBUG": "true", "DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "manage.py", "check"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DEBUG must be off" in result.stderr


def test_a_sqlite_url_gets_the_default_databases_options(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Writers queue from their transaction's start (IMMEDIATE), as the database limit store needs across workers."""
    code = "from django.conf import settings;print(settings.DATABASES['default']['OPTIONS']['transaction_mode'])"
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'gateway.sqlite3'}",
        "DATA_DIR": str(tmp_path),
        "DJANGO_SETTINGS_MODULE": "gateway.settings",
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup();" + code], env=env, capture_output=True, text=True
    )
    assert result.stdout.split() == ["IMMEDIATE"], result.stderr


def test_urls_switch_to_postgres_and_redis(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    code = (
        "from django.conf import settings;"
        "print(settings.DATABASES['default']['ENGINE']);"
        "print(settings.CACHES['default']['BACKEND'])"
    )
    env = {
        "DATABASE_URL": "postgres://u@db.example.org:5432/gw",
        "REDIS_URL": "redis://cache.example.org:6379/0",
        "DATA_DIR": str(tmp_path),
        "DJANGO_SETTINGS_MODULE": "gateway.settings",
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup();" + code], env=env, capture_output=True, text=True
    )
    assert result.stdout.split() == ["django.db.backends.postgresql", "django.core.cache.backends.redis.RedisCache"]
