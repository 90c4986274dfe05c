"""Log in with Globus and get access tokens for the inference gateway, for scripts and curl.

    python tools/inference_auth_token.py authenticate [--force]
    curl -H "Authorization: Bearer $(python tools/inference_auth_token.py get_access_token)" ...
    python tools/inference_auth_token.py get_time_until_token_expiration
    python tools/inference_auth_token.py revoke

Settings come from options or, failing those, from the environment:

    --auth-client-id     INFERENCE_AUTH_CLIENT_ID     the native (public) Globus app users log in with
    --gateway-client-id  INFERENCE_GATEWAY_CLIENT_ID  the gateway's Globus client: the tokens' resource server
    --scope              INFERENCE_GATEWAY_SCOPE      default: https://auth.globus.org/scopes/<gateway>/action_all
    --policies           INFERENCE_GATEWAY_POLICIES   comma-separated authentication policies the gateway checks
    --app-name           INFERENCE_AUTH_APP_NAME      default: inference-gateway-cli

Tokens (with a refresh token, so `get_access_token` never needs a browser) are kept by globus-sdk in
~/.globus/app/<auth client id>/<app name>/tokens.json. globus-sdk's GLOBUS_SDK_ENVIRONMENT and
GLOBUS_SDK_SERVICE_URL_AUTH apply as usual, which is how the tests point this tool at a fake Globus.

This is a user-side helper; the gateway never imports it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import globus_sdk
from globus_sdk.gare import GlobusAuthorizationParameters
from globus_sdk.login_flows import CommandLineLoginFlowEOFError
from globus_sdk.token_storage import TokenStorage, TokenValidationError

DEFAULT_APP_NAME = "inference-gateway-cli"
LOGIN_HINT = "python tools/inference_auth_token.py authenticate"
RELOGIN_HINT = f"{LOGIN_HINT} --force"


@dataclass(frozen=True, slots=True)
class ToolConfig:
    auth_client_id: str
    gateway_client_id: str
    scope: str
    policies: tuple[str, ...]
    app_name: str


class ToolError(Exception):
    """A failure to report in one line on stderr, exit status 1."""


# --- configuration ----------------------------------------------------------------------------


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inference_auth_token.py",
        description="Globus login and access tokens for the inference gateway.",
    )
    parser.add_argument(
        "--auth-client-id",
        default=environ.get("INFERENCE_AUTH_CLIENT_ID"),
        metavar="UUID",
        help="the native Globus app to log in with ($INFERENCE_AUTH_CLIENT_ID)",
    )
    parser.add_argument(
        "--gateway-client-id",
        default=environ.get("INFERENCE_GATEWAY_CLIENT_ID"),
        metavar="UUID",
        help="the gateway's Globus client ($INFERENCE_GATEWAY_CLIENT_ID)",
    )
    parser.add_argument(
        "--scope",
        default=environ.get("INFERENCE_GATEWAY_SCOPE"),
        help="the gateway's scope ($INFERENCE_GATEWAY_SCOPE; default: its action_all scope)",
    )
    parser.add_argument(
        "--policies",
        default=environ.get("INFERENCE_GATEWAY_POLICIES", ""),
        metavar="ID,ID",
        help="authentication policies to satisfy at login ($INFERENCE_GATEWAY_POLICIES)",
    )
    parser.add_argument(
        "--app-name",
        default=environ.get("INFERENCE_AUTH_APP_NAME", DEFAULT_APP_NAME),
        help="names the token file ($INFERENCE_AUTH_APP_NAME; default: %(default)s)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    login = commands.add_parser("authenticate", help="log in (once; again with --force)")
    login.add_argument("--force", action="store_true", help="log in again, even with valid tokens")
    commands.add_parser("get_access_token", help="print a valid access token, refreshing it if needed")
    commands.add_parser("get_time_until_token_expiration", help="print seconds until the access token expires")
    commands.add_parser("revoke", help="revoke the tokens at Globus and forget them (log out)")
    return parser


def config_from(options: argparse.Namespace, parser: argparse.ArgumentParser) -> ToolConfig:
    """The settings from parsed options; a missing client id is a usage error (exit status 2)."""
    missing = [
        f"--{name.replace('_', '-')} (or {variable})"
        for name, variable in (
            ("auth_client_id", "INFERENCE_AUTH_CLIENT_ID"),
            ("gateway_client_id", "INFERENCE_GATEWAY_CLIENT_ID"),
        )
        if not getattr(options, name)
    ]
    if missing:
        parser.error(f"missing {' and '.join(missing)}")
    gateway = options.gateway_client_id
    return ToolConfig(
        auth_client_id=options.auth_client_id,
        gateway_client_id=gateway,
        scope=options.scope or f"https://auth.globus.org/scopes/{gateway}/action_all",
        policies=tuple(policy.strip() for policy in options.policies.split(",") if policy.strip()),
        app_name=options.app_name,
    )


def build_app(config: ToolConfig, *, storage: TokenStorage | Literal["json", "memory"] = "json") -> globus_sdk.UserApp:
    """A UserApp for the gateway's scope that never starts a login on its own.

    Without a validation-error handler, missing or unusable tokens raise instead of prompting, so
    `$(... get_access_token)` cannot hang on a login prompt hidden in a captured stdout.
    """
    app_config = globus_sdk.GlobusAppConfig(
        request_refresh_tokens=True,
        token_storage=storage,
        token_validation_error_handler=None,
    )
    return globus_sdk.UserApp(
        config.app_name,
        client_id=config.auth_client_id,
        scope_requirements={config.gateway_client_id: [config.scope]},
        config=app_config,
    )


# --- commands ---------------------------------------------------------------------------------


def authenticate(app: globus_sdk.UserApp, config: ToolConfig, *, force: bool) -> bool:
    """Run the login flow if tokens are missing or unusable, or always with `force`. True if it ran."""
    if not (force or app.login_required()):
        return False
    if force:
        # A forced login is often to switch identity, which the storage would refuse as a mismatch.
        forget_tokens(app.token_storage.token_storage)
        app.token_storage.identity_id = None
    params = GlobusAuthorizationParameters(
        session_required_policies=list(config.policies) or None,
        prompt="login" if force else None,
    )
    try:
        app.login(auth_params=params, force=True)
    except CommandLineLoginFlowEOFError as error:
        raise ToolError("logging in needs a terminal to paste the authorization code into") from error
    except globus_sdk.GlobusAPIError as error:
        raise ToolError(f"Globus refused the login ({error.http_status}); try again") from error
    return True


def get_access_token(app: globus_sdk.UserApp, config: ToolConfig) -> str:
    """A gateway access token valid for at least a minute more, refreshed through Globus if needed."""
    try:
        authorizer = app.get_authorizer(config.gateway_client_id)
        assert isinstance(authorizer, globus_sdk.RefreshTokenAuthorizer)
        authorizer.ensure_valid_token()
    except TokenValidationError as error:
        raise ToolError(f"no usable tokens ({error}); run: {LOGIN_HINT}") from error
    except globus_sdk.GlobusAPIError as error:
        raise ToolError(f"Globus refused to refresh the token ({error.http_status}); run: {RELOGIN_HINT}") from error
    except globus_sdk.NetworkError as error:
        raise ToolError(f"could not reach Globus to refresh the token: {error}") from error
    assert authorizer.access_token is not None
    return authorizer.access_token


def seconds_until_expiration(app: globus_sdk.UserApp, config: ToolConfig, *, now: float) -> int:
    """Seconds the stored access token has left (0 once expired), read from storage without network."""
    try:
        token_data = app.token_storage.get_token_data(config.gateway_client_id)
    except TokenValidationError as error:
        raise ToolError(f"no usable tokens ({error}); run: {LOGIN_HINT}") from error
    return max(0, int(token_data.expires_at_seconds - now))


def revoke(app: globus_sdk.UserApp, config: ToolConfig) -> list[str]:
    """Revoke every stored token at Globus and forget them all; returns warnings for failed revocations.

    Unlike `UserApp.logout`, which stops at the first failure, local tokens are removed even when
    Globus cannot be reached: someone logging out wants them gone from this machine.
    """
    storage = app.token_storage.token_storage
    client = globus_sdk.NativeAppAuthClient(config.auth_client_id, app_name=config.app_name)
    warnings = []
    for token_data in storage.get_token_data_by_resource_server().values():
        for token in (token_data.access_token, token_data.refresh_token):
            if token is None:
                continue
            try:
                client.oauth2_revoke_token(token)
            except (globus_sdk.GlobusAPIError, globus_sdk.NetworkError) as error:
                warnings.append(f"could not revoke a {token_data.resource_server} token at Globus: {error}")
    forget_tokens(storage)
    return warnings


def forget_tokens(storage: TokenStorage) -> None:
    for resource_server in storage.get_token_data_by_resource_server():
        storage.remove_token_data(resource_server)


# --- entry point ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    parser = build_parser(os.environ if environ is None else environ)
    options = parser.parse_args(argv)
    config = config_from(options, parser)
    with build_app(config) as app:
        try:
            _run(options, app, config)
        except ToolError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    return 0


def _run(options: argparse.Namespace, app: globus_sdk.UserApp, config: ToolConfig) -> None:
    if options.command == "authenticate":
        ran = authenticate(app, config, force=options.force)
        print("Logged in." if ran else "Already logged in; use --force to log in again.", file=sys.stderr)
    elif options.command == "get_access_token":
        print(get_access_token(app, config))
    elif options.command == "get_time_until_token_expiration":
        print(seconds_until_expiration(app, config, now=time.time()))
    else:
        for warning in revoke(app, config):
            print(f"warning: {warning}", file=sys.stderr)
        print("Logged out: tokens removed from this machine.", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
