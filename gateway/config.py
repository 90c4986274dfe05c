"""The gateway's settings: one typed object read from the environment (see `.env.example`)."""

from __future__ import annotations

import os
import secrets
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import Field, model_validator
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
    USAGE_FLUSH_SECONDS: float = Field(default=0.5, gt=0, le=60)

    # How long a worker trusts what it read from the database before reading it again.
    ROUTING_CACHE_SECONDS: float = Field(default=5.0, ge=0)
    API_KEY_CACHE_SECONDS: float = Field(default=30.0, ge=0)

    # Largest request body accepted on the inference routes.
    MAX_REQUEST_BYTES: int = Field(default=8 * 1024 * 1024, ge=1024)

    @model_validator(mode="before")
    @classmethod
    def _csv_fields(cls, data: dict[str, object]) -> dict[str, object]:
        for name in ("ALLOWED_HOSTS", "CSRF_TRUSTED_ORIGINS"):
            if name in data:
                data[name] = _split_csv(data[name])
        return data

    @property
    def is_production(self) -> bool:
        return self.GATEWAY_ENV is Environment.PRODUCTION

    def check_production_safety(self) -> None:
        """Refuse to boot production with a default secret, DEBUG on or a wildcard host."""
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
            raise UnsafeSettingsError("DATABASE_URL must point at PostgreSQL in production.")

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
