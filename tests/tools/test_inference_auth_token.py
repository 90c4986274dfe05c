"""tools/inference_auth_token.py: settings, stored tokens, refresh and logout (globus-sdk storage, fake Globus)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import globus_sdk
import httpx
import pytest
from globus_sdk.token_storage import JSONTokenStorage, MemoryTokenStorage, TokenStorage, TokenStorageData

from tests.servers import free_port, running
from tools import inference_auth_token as tool

AUTH_ID = "55555555-5555-4555-8555-555555555555"  # the users' native app
GATEWAY_ID, GATEWAY_SECRET = "66666666-6666-4666-8666-666666666666", "gateway-secret"
GATEWAY_SCOPE = f"https://auth.globus.org/scopes/{GATEWAY_ID}/action_all"
IDENTITY_ID = "77777777-7777-4777-8777-777777777777"
ENV = {"INFERENCE_AUTH_CLIENT_ID": AUTH_ID, "INFERENCE_GATEWAY_CLIENT_ID": GATEWAY_ID}


def parse(argv: list[str], environ: dict[str, str]) -> tool.ToolConfig:
    parser = tool.build_parser(environ)
    return tool.config_from(parser.parse_args(argv), parser)


def token_data(access_token: str, *, expires_in: int, refresh: str = "stored-refresh-token") -> TokenStorageData:
    return TokenStorageData(
        resource_server=GATEWAY_ID,
        identity_id=IDENTITY_ID,
        scope=GATEWAY_SCOPE,
        access_token=access_token,
        refresh_token=refresh,
        expires_at_seconds=int(time.time()) + expires_in,
        token_type="Bearer",
    )


def home_storage(config: tool.ToolConfig) -> TokenStorage:
    """The JSON token file the tool itself uses, found the way globus-sdk finds it."""
    return JSONTokenStorage.for_globus_app(
        client_id=config.auth_client_id,
        app_name=config.app_name,
        config=globus_sdk.GlobusAppConfig(),
        namespace="DEFAULT",
    )


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


# --- settings ---------------------------------------------------------------------------------


def test_settings_come_from_the_environment_with_the_scope_derived_from_the_gateway() -> None:
    config = parse(["get_access_token"], {**ENV, "INFERENCE_GATEWAY_POLICIES": " p1, ,p2 "})

    assert config == tool.ToolConfig(
        auth_client_id=AUTH_ID,
        gateway_client_id=GATEWAY_ID,
        scope=GATEWAY_SCOPE,
        policies=("p1", "p2"),
        app_name=tool.DEFAULT_APP_NAME,
    )


def test_options_override_the_environment() -> None:
    environ = {**ENV, "INFERENCE_GATEWAY_SCOPE": "env-scope", "INFERENCE_AUTH_APP_NAME": "env-app"}

    config = parse(["--scope", "option-scope", "--app-name", "option-app", "--policies", "p3", "revoke"], environ)

    assert (config.scope, config.app_name, config.policies) == ("option-scope", "option-app", ("p3",))


def test_missing_client_ids_are_a_usage_error_naming_both_variables(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        parse(["get_access_token"], {})

    assert caught.value.code == 2
    error = capsys.readouterr().err
    assert "INFERENCE_AUTH_CLIENT_ID" in error and "INFERENCE_GATEWAY_CLIENT_ID" in error


def test_force_belongs_to_authenticate_only() -> None:
    parser = tool.build_parser(ENV)

    assert parser.parse_args(["authenticate", "--force"]).force is True
    with pytest.raises(SystemExit):
        parser.parse_args(["get_access_token", "--force"])


# --- stored tokens, offline -------------------------------------------------------------------


@pytest.mark.parametrize(("expires_in", "left"), [(600, 600), (-30, 0)])
def test_time_until_expiration_is_read_from_storage(expires_in: int, left: int) -> None:
    config = parse(["revoke"], ENV)
    storage = MemoryTokenStorage()
    storage.store_token_data_by_resource_server({GATEWAY_ID: token_data("stored", expires_in=expires_in)})
    now = time.time()

    with tool.build_app(config, storage=storage) as app:
        assert tool.seconds_until_expiration(app, config, now=now) in (left, left - 1)


def test_cli_prints_time_left_from_the_users_token_file(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = parse(["revoke"], ENV)
    home_storage(config).store_token_data_by_resource_server({GATEWAY_ID: token_data("stored", expires_in=900)})

    assert tool.main(["get_time_until_token_expiration"], ENV) == 0

    assert 895 <= int(capsys.readouterr().out) <= 900
    assert (home / ".globus" / "app" / AUTH_ID / tool.DEFAULT_APP_NAME / "tokens.json").is_file()


def test_without_tokens_get_access_token_asks_to_authenticate_and_prints_nothing(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tool.main(["get_access_token"], ENV) == 1

    output = capsys.readouterr()
    assert output.out == ""  # `$(... get_access_token)` must not capture a prompt or a message
    assert "inference_auth_token.py authenticate" in output.err


def test_authenticate_skips_the_login_flow_when_tokens_are_usable(capsys: pytest.CaptureFixture[str]) -> None:
    # A login flow would prompt on stdin, which fails under pytest: returning False proves none ran.
    config = parse(["authenticate"], ENV)
    storage = MemoryTokenStorage()
    openid = TokenStorageData("auth.globus.org", IDENTITY_ID, "openid", "auth-token", "auth-refresh", 2**31, "Bearer")
    storage.store_token_data_by_resource_server(
        {GATEWAY_ID: token_data("stored", expires_in=600), "auth.globus.org": openid}
    )

    with tool.build_app(config, storage=storage) as app:
        assert tool.authenticate(app, config, force=False) is False


# --- against the fake Globus ------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_url() -> Iterator[str]:
    port = free_port()
    args = [sys.executable, "-m", "fakes.globus", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with running([*args, "--client", f"{GATEWAY_ID}:{GATEWAY_SECRET}"], f"{url}/fake/stats"):
        yield url


@pytest.fixture
def globus(fake_url: str, home: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("GLOBUS_SDK_SERVICE_URL_AUTH", f"{fake_url}/")
    httpx.post(f"{fake_url}/fake/reset").raise_for_status()
    return fake_url


def login_at_fake(fake_url: str, *, expires_in: int) -> dict[str, Any]:
    """What a finished login leaves behind: a user token issued to the native app, and its refresh token."""
    fields = {"identity": {"id": IDENTITY_ID, "username": "ada@anl.gov"}, "client_id": AUTH_ID}
    reply = httpx.post(f"{fake_url}/fake/tokens", json={**fields, "expires_in": expires_in})
    reply.raise_for_status()
    grant: dict[str, Any] = reply.json()
    home_storage(parse(["revoke"], ENV)).store_token_data_by_resource_server(
        {GATEWAY_ID: token_data(grant["token"], expires_in=expires_in, refresh=grant["refresh_token"])}
    )
    return grant


def introspect(token: str) -> dict[str, Any]:
    client = globus_sdk.ConfidentialAppAuthClient(GATEWAY_ID, GATEWAY_SECRET)
    return dict(client.oauth2_token_introspect(token).data)


def stats(fake_url: str) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(f"{fake_url}/fake/stats").json()
    return data


def test_valid_stored_token_is_printed_without_calling_globus(globus: str, capsys: pytest.CaptureFixture[str]) -> None:
    grant = login_at_fake(globus, expires_in=3600)

    assert tool.main(["get_access_token"], ENV) == 0

    assert capsys.readouterr().out.strip() == grant["token"]
    assert stats(globus)["requests"] == {}


def test_expiring_token_is_refreshed_through_globus_and_stored(globus: str, capsys: pytest.CaptureFixture[str]) -> None:
    grant = login_at_fake(globus, expires_in=30)  # inside globus-sdk's one-minute safety margin

    assert tool.main(["get_access_token"], ENV) == 0

    fresh = capsys.readouterr().out.strip()
    assert fresh and fresh != grant["token"]
    assert introspect(fresh)["sub"] == IDENTITY_ID
    assert stats(globus)["grants"] == {"refresh_token": 1}
    stored = home_storage(parse(["revoke"], ENV)).get_token_data(GATEWAY_ID)
    assert stored is not None and stored.access_token == fresh


def test_revoke_revokes_at_globus_and_empties_the_token_file(globus: str, capsys: pytest.CaptureFixture[str]) -> None:
    grant = login_at_fake(globus, expires_in=3600)

    assert tool.main(["revoke"], ENV) == 0

    assert introspect(grant["token"]) == {"active": False}
    with pytest.raises(globus_sdk.AuthAPIError):
        globus_sdk.NativeAppAuthClient(AUTH_ID).oauth2_refresh_token(grant["refresh_token"])
    assert home_storage(parse(["revoke"], ENV)).get_token_data_by_resource_server() == {}
    assert "warning" not in capsys.readouterr().err


def test_revoke_empties_the_token_file_even_when_globus_refuses(
    globus: str, capsys: pytest.CaptureFixture[str]
) -> None:
    grant = login_at_fake(globus, expires_in=3600)
    httpx.post(f"{globus}/fake/faults", json={"status": 400}).raise_for_status()

    assert tool.main(["revoke"], ENV) == 0

    assert capsys.readouterr().err.count("warning: could not revoke") == 2  # access and refresh token
    assert home_storage(parse(["revoke"], ENV)).get_token_data_by_resource_server() == {}
    httpx.delete(f"{globus}/fake/faults").raise_for_status()
    assert introspect(grant["token"])["active"] is True


def test_refresh_refused_by_globus_asks_to_log_in_again(globus: str, capsys: pytest.CaptureFixture[str]) -> None:
    grant = login_at_fake(globus, expires_in=30)
    globus_sdk.NativeAppAuthClient(AUTH_ID).oauth2_revoke_token(grant["refresh_token"])

    assert tool.main(["get_access_token"], ENV) == 1

    output = capsys.readouterr()
    assert output.out == ""
    assert "refused to refresh the token (400)" in output.err and "authenticate --force" in output.err
