"""A fake of Globus Auth and Globus Groups, as a pure ASGI app, for the real globus-sdk to talk to.

It serves the few routes the gateway and its users' tool need, shaped like globus-sdk 4.10 expects them
(checked against the SDK's request code and its registered example responses):

    POST /v2/oauth2/token/introspect   token introspection (HTTP Basic client auth, form body)
    POST /v2/oauth2/token              client-credentials, dependent-token and refresh-token grants
    POST /v2/oauth2/token/revoke       token revocation
    GET  /v2/groups/my_groups          the caller's groups (Globus Groups)

Point globus-sdk at it with ``GLOBUS_SDK_SERVICE_URL_AUTH=http://127.0.0.1:PORT/`` and
``GLOBUS_SDK_SERVICE_URL_GROUPS=http://127.0.0.1:PORT/``; the SDK's paths already start with /v2/.

Tests drive it through control routes under /fake/:

    POST   /fake/tokens            register an access token: identity, session, groups, policy results
    DELETE /fake/tokens/{token}    revoke it
    POST   /fake/faults            answer every real route (of one service, or both) with an error
                                   status and/or after a delay; DELETE /fake/faults ends the outage
    GET    /fake/stats             calls per route and grant, introspections per token, concurrency
    POST   /fake/reset             forget tokens, faults and counters

Run it with `python -m fakes.globus --port 8002`. The app needs only the standard
library and orjson; uvicorn is imported only to run it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import hmac
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

import orjson

from fakes import asgi
from fakes.asgi import JSON, Header, Receive, Scope, Send

ISSUER = "https://auth.globus.org"
GROUPS_RESOURCE_SERVER = "groups.api.globus.org"
GROUPS_SCOPE = "urn:globus:auth:scope:groups.api.globus.org:view_my_groups_and_memberships"
DEPENDENT_TOKEN_GRANT = "urn:globus:auth:grant_type:dependent_token"  # noqa: S105 - a grant type, not a secret
# Globus Compute's resource server is a service name, and its scope is built on its client id (as in globus-sdk).
COMPUTE_RESOURCE_SERVER = "funcx_service"
COMPUTE_SCOPE = "https://auth.globus.org/scopes/facd7ccc-c5f4-42aa-916b-a0e270e2c2a9/all"
TOKEN_LIFETIME = 172800  # Globus access tokens live 48 hours
# Client identities share one identity provider; the real one's id is not published, so this is ours.
CLIENTS_IDP = "2a3b7ec6-3f8e-4b1e-9c4a-0c1e5ad1c0de"
CLIENTS_DOMAIN = "clients.auth.globus.org"
# Defaults for `python -m ...` runs: the gateway's confidential client and the users' native app.
DEMO_CLIENT_ID = "6c9d4a51-7d6e-4f0a-9b3c-2f1e8a7b5c40"
DEMO_CLIENT_SECRET = "fake-globus-demo-secret"  # noqa: S105 - a fake's fixed demo credential
DEMO_NATIVE_CLIENT_ID = "0b5e3f0e-8a41-4c2d-b1f7-9d6c3e2a1f08"
# Scopes the dependent-token grant can issue, and the resource server each belongs to.
_DEPENDENT_RESOURCE_SERVERS = {GROUPS_SCOPE: GROUPS_RESOURCE_SERVER}
# Scopes a confidential client can get for itself (client-credentials grant).
_CLIENT_RESOURCE_SERVERS = {**_DEPENDENT_RESOURCE_SERVERS, COMPUTE_SCOPE: COMPUTE_RESOURCE_SERVER}
_MEMBERSHIP_STATUSES = frozenset(("active", "declined", "invited", "left", "pending", "rejected", "removed"))


def token_id(token: str) -> str:
    """How /fake/stats names a token: never the token itself (sha256(token)[:12], as in our logs)."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class FakeGlobusConfig:
    """The confidential clients the fake knows (id -> secret) and its pacing. Checked on creation."""

    clients: Mapping[str, str] = field(default_factory=lambda: {DEMO_CLIENT_ID: DEMO_CLIENT_SECRET})
    latency: float = 0.0  # added to every real route, so concurrent callers overlap
    token_lifetime: int = TOKEN_LIFETIME  # of tokens the fake issues (dependent grant, refresh)

    def __post_init__(self) -> None:
        checks = (
            (bool(self.clients) and all(self.clients) and all(self.clients.values()), "clients need ids and secrets"),
            (self.latency >= 0, "latency must be >= 0"),
            (self.token_lifetime >= 1, "token_lifetime must be at least 1"),
        )
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ValueError("; ".join(problems))


def create_app(config: FakeGlobusConfig) -> FakeGlobus:
    """Build the ASGI app for `config`."""
    return FakeGlobus(config)


# --- the fake's records -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identity:
    id: str
    username: str
    name: str | None
    email: str | None
    organization: str | None
    identity_provider: str
    identity_provider_display_name: str

    def detail(self) -> JSON:
        """One `identity_set_detail` entry: the Identities API fields plus the OIDC-style ones."""
        return {
            "id": self.id,
            "sub": self.id,
            "username": self.username,
            "name": self.name,
            "email": self.email,
            "organization": self.organization,
            "identity_provider": self.identity_provider,
            "identity_provider_display_name": self.identity_provider_display_name,
            "identity_type": "login",
            "status": "used",
        }


@dataclass(frozen=True, slots=True)
class Authentication:
    identity_id: str
    idp: str
    auth_time: int
    acr: str | None
    amr: tuple[str, ...] | None

    def wire(self) -> JSON:
        # Many identity providers send no acr/amr, and Globus then leaves the keys out.
        body: JSON = {"auth_time": self.auth_time, "idp": self.idp}
        if self.acr is not None:
            body["acr"] = self.acr
        if self.amr is not None:
            body["amr"] = list(self.amr)
        return body


@dataclass(frozen=True, slots=True)
class Group:
    id: str
    name: str
    identity_id: str
    role: str
    status: str
    parent_id: str | None


@dataclass(frozen=True, slots=True)
class Grant:
    """Everything Globus knows about one access token."""

    token: str
    client_id: str  # the client the token was issued to
    scope: str
    resource_server: str
    audience: tuple[str, ...]  # clients allowed to introspect it and exchange it for dependent tokens
    issued_at: int
    expires_at: int
    identities: tuple[Identity, ...]  # the identity set; the first one is `sub`
    session_id: str | None
    authentications: tuple[Authentication, ...]
    groups: tuple[Group, ...]
    policies: Mapping[str, bool]  # policy id -> evaluation; policies not listed pass
    dependent_scopes: tuple[str, ...]
    revoked: bool = False

    @property
    def subject(self) -> Identity:
        return self.identities[0]

    def active(self, now: float) -> bool:
        return not self.revoked and now < self.expires_at


def _introspection(grant: Grant, include: set[str], policies: Sequence[str]) -> JSON:
    subject = grant.subject
    body: JSON = {
        "active": True,
        "token_type": "Bearer",
        "scope": grant.scope,
        "client_id": grant.client_id,
        "sub": subject.id,
        "username": subject.username,
        "name": subject.name,
        "email": subject.email,
        "aud": list(grant.audience),
        "iss": ISSUER,
        "exp": grant.expires_at,
        "iat": grant.issued_at,
        "nbf": grant.issued_at,
        "dependent_tokens_cache_id": hashlib.sha256(f"{grant.client_id}:{grant.token}".encode()).hexdigest(),
    }
    if "identity_set" in include:
        body["identity_set"] = [identity.id for identity in grant.identities]
    if "identity_set_detail" in include:
        body["identity_set_detail"] = [identity.detail() for identity in grant.identities]
    if "session_info" in include:
        authentications = {a.identity_id: a.wire() for a in grant.authentications}
        body["session_info"] = {"session_id": grant.session_id, "authentications": authentications}
    if policies:
        body["policy_evaluations"] = {p: {"evaluation": grant.policies.get(p, True)} for p in policies}
    return body


def _group_body(group: Group, grant: Grant) -> JSON:
    member = next((i for i in grant.identities if i.id == group.identity_id), grant.subject)
    membership = {
        "group_id": group.id,
        "identity_id": member.id,
        "username": member.username,
        "role": group.role,
        "status": group.status,
    }
    return {
        "name": group.name,
        "parent_id": group.parent_id,
        "id": group.id,
        "group_type": "regular",
        "enforce_session": False,
        "session_limit": 28800,
        "session_timeouts": {},
        "my_memberships": [membership],
        "policies": {"group_visibility": "private", "group_members_visibility": "managers"},
    }


# --- registering tokens (POST /fake/tokens) ---------------------------------------------------


class ControlError(Exception):
    """A bad control request: answered 400 with {"detail": message}."""


def _get(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    # JSON true/false are ints to Python; no field here takes a bool where a number is meant.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _types(kind)):
        raise ControlError(f"{name} has the wrong type")
    return value


def _types(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _object(value: object, name: str, allowed: frozenset[str]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ControlError(f"{name} must be an object")
    unknown = sorted(value.keys() - allowed)
    if unknown:
        # Fail loudly so a typo in a test's setup does not silently test nothing.
        raise ControlError(f"unknown {name} fields: {', '.join(unknown)}")
    return value


def _objects(body: Mapping[str, Any], name: str, allowed: frozenset[str]) -> list[Mapping[str, Any]]:
    items = _get(body, name, list, [])
    return [_object(item, f"{name} item", allowed) for item in items]


_TOKEN_FIELDS = frozenset(
    (
        "token",
        "kind",
        "identity",
        "linked_identities",
        "authentications",
        "session_id",
        "client_id",
        "name",
        "scope",
        "resource_server",
        "audience",
        "expires_in",
        "groups",
        "policies",
        "dependent_scopes",
    )
)
_IDENTITY_FIELDS = frozenset(
    ("id", "username", "name", "email", "organization", "identity_provider", "identity_provider_display_name")
)
_AUTHENTICATION_FIELDS = frozenset(("identity_id", "idp", "auth_time", "acr", "amr"))
_GROUP_FIELDS = frozenset(("id", "name", "identity_id", "role", "status", "parent_id"))
_USER_ONLY_FIELDS = frozenset(("identity", "linked_identities", "authentications", "session_id"))
_SERVICE_ONLY_FIELDS = frozenset(("name",))  # a user's name belongs to their identity


def _identity(body: Mapping[str, Any]) -> Identity:
    username = _get(body, "username", str) or f"user-{secrets.token_hex(4)}@example.org"
    if "@" not in username:
        raise ControlError("identity.username must look like user@domain")
    domain = username.rpartition("@")[2]
    return Identity(
        id=_get(body, "id", str) or str(uuid.uuid4()),
        username=username,
        name=_get(body, "name", str),
        email=_get(body, "email", str, username),
        organization=_get(body, "organization", str),
        # One identity provider per domain, with a stable id, as Globus has.
        identity_provider=_get(body, "identity_provider", str) or str(uuid.uuid5(uuid.NAMESPACE_DNS, domain)),
        identity_provider_display_name=_get(body, "identity_provider_display_name", str, domain),
    )


def _client_identity(client_id: str, name: str | None) -> Identity:
    return Identity(
        id=client_id,  # a client's identity id is its client id
        username=f"{client_id}@{CLIENTS_DOMAIN}",
        name=name,
        email=None,
        organization=None,
        identity_provider=CLIENTS_IDP,
        identity_provider_display_name="Globus Auth Clients",
    )


def _authentications(body: Mapping[str, Any], identities: Sequence[Identity], now: int) -> tuple[Authentication, ...]:
    by_id = {identity.id: identity for identity in identities}
    items = _objects(body, "authentications", _AUTHENTICATION_FIELDS)
    if "authentications" not in body:
        items = [{}]  # by default the user signed in with their primary identity a minute ago
    result = []
    for item in items:
        identity_id = _get(item, "identity_id", str, identities[0].id)
        if identity_id not in by_id:
            raise ControlError(f"authentication for {identity_id}, which is not in the identity set")
        amr = _get(item, "amr", list)
        result.append(
            Authentication(
                identity_id=identity_id,
                idp=_get(item, "idp", str, by_id[identity_id].identity_provider),
                auth_time=_get(item, "auth_time", int, now - 60),
                acr=_get(item, "acr", str),
                amr=None if amr is None else tuple(str(method) for method in amr),
            )
        )
    return tuple(result)


def _groups(body: Mapping[str, Any], subject: Identity) -> tuple[Group, ...]:
    groups = []
    for item in _objects(body, "groups", _GROUP_FIELDS):
        status = _get(item, "status", str, "active")
        if status not in _MEMBERSHIP_STATUSES:
            raise ControlError(f"unknown membership status {status!r}")
        groups.append(
            Group(
                id=_get(item, "id", str) or str(uuid.uuid4()),
                name=_get(item, "name", str, "fake group"),
                identity_id=_get(item, "identity_id", str, subject.id),
                role=_get(item, "role", str, "member"),
                status=status,
                parent_id=_get(item, "parent_id", str),
            )
        )
    return tuple(groups)


def _policies(body: Mapping[str, Any]) -> dict[str, bool]:
    policies = _get(body, "policies", dict, {})
    if not all(isinstance(result, bool) for result in policies.values()):
        raise ControlError("policies maps policy ids to true or false")
    return dict(policies)


def _dependent_scopes(body: Mapping[str, Any]) -> tuple[str, ...]:
    scopes = tuple(_get(body, "dependent_scopes", list, [GROUPS_SCOPE]))
    unknown = [scope for scope in scopes if scope not in _DEPENDENT_RESOURCE_SERVERS]
    if unknown:
        raise ControlError(f"the fake can only issue dependent tokens for {GROUPS_SCOPE}")
    return scopes


def parse_grant(body: Mapping[str, Any], *, default_audience: str, now: int) -> Grant:
    """A Grant from a POST /fake/tokens body; raises ControlError on a bad or unknown field."""
    body = _object(body, "token", _TOKEN_FIELDS)
    kind = _get(body, "kind", str, "user")
    if kind == "service":
        stray = sorted(body.keys() & _USER_ONLY_FIELDS)
        if stray:
            raise ControlError(f"a service token has no {', '.join(stray)}")
        client_id = _get(body, "client_id", str)
        if not client_id:
            raise ControlError("a service token needs the client_id it was issued to")
        identities: tuple[Identity, ...] = (_client_identity(client_id, _get(body, "name", str)),)
        session_id, authentications = None, tuple[Authentication, ...]()
    elif kind == "user":
        primary = _identity(_object(body.get("identity", {}), "identity", _IDENTITY_FIELDS))
        linked = [_identity(item) for item in _objects(body, "linked_identities", _IDENTITY_FIELDS)]
        identities = (primary, *linked)
        client_id = _get(body, "client_id", str, DEMO_NATIVE_CLIENT_ID)
        session_id = _get(body, "session_id", str) or str(uuid.uuid4())
        authentications = _authentications(body, identities, now)
    else:
        raise ControlError("kind must be 'user' or 'service'")
    if kind == "user" and body.keys() & _SERVICE_ONLY_FIELDS:
        raise ControlError("a user token takes its name from identity.name")
    resource_server = _get(body, "resource_server", str, default_audience)
    audience = _get(body, "audience", list, [resource_server])
    if not all(isinstance(item, str) for item in audience):
        raise ControlError("audience must be a list of strings")
    return Grant(
        token=_get(body, "token", str) or secrets.token_urlsafe(32),
        client_id=client_id,
        scope=_get(body, "scope", str, f"https://auth.globus.org/scopes/{resource_server}/action_all"),
        resource_server=resource_server,
        audience=tuple(audience),
        issued_at=now,
        expires_at=now + _get(body, "expires_in", int, TOKEN_LIFETIME),
        identities=identities,
        session_id=session_id,
        authentications=authentications,
        groups=_groups(body, identities[0]),
        policies=_policies(body),
        dependent_scopes=_dependent_scopes(body),
    )


# --- faults (POST /fake/faults) ---------------------------------------------------------------

_SERVICES = ("auth", "groups")
_FAULT_FIELDS = frozenset(("status", "delay", "retry_after", "service"))


@dataclass(frozen=True, slots=True)
class Fault:
    """An outage: wait `delay` seconds (or until the client gives up), then fail with `status`, if set."""

    status: int | None
    delay: float
    retry_after: int | None

    def wire(self) -> JSON:
        return {"status": self.status, "delay": self.delay, "retry_after": self.retry_after}


def parse_fault(body: object) -> tuple[tuple[str, ...], Fault]:
    """The services a POST /fake/faults body targets, and the fault; raises ControlError."""
    body = _object(body, "fault", _FAULT_FIELDS)
    status = _get(body, "status", int)
    delay = float(_get(body, "delay", (int, float), 0.0))
    retry_after = _get(body, "retry_after", int)
    service = _get(body, "service", str)
    if status is not None and not 400 <= status < 600:
        raise ControlError("status must be a 4xx or 5xx code")
    if delay < 0 or (retry_after is not None and retry_after < 0):
        raise ControlError("delay and retry_after must be >= 0")
    if status is None and not delay:
        raise ControlError("a fault needs a status, a delay, or both")
    if service is not None and service not in _SERVICES:
        raise ControlError("service must be 'auth' or 'groups'")
    return ((service,) if service else _SERVICES), Fault(status=status, delay=delay, retry_after=retry_after)


# --- HTTP plumbing ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    headers: Mapping[bytes, bytes]
    query: Mapping[str, str]
    body: bytes

    def form(self) -> dict[str, str]:
        return _first_values(self.body.decode("utf-8", "replace"))

    def json(self) -> object:
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            raise ControlError("body must be JSON") from None


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    headers: tuple[Header, ...] = ()


def _first_values(encoded: str) -> dict[str, str]:
    return {name: values[0] for name, values in parse_qs(encoded, keep_blank_values=True).items()}


def _json(status: int, payload: object, *headers: Header) -> Response:
    return Response(status, orjson.dumps(payload), (asgi.JSON_TYPE, *headers))


def _split(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def _oauth_error(status: int, error: str) -> Response:
    """Errors of the OAuth2 token endpoint (RFC 6749 section 5.2)."""
    return _json(status, {"error": error})


def _auth_error(status: int, code: str, detail: str) -> Response:
    """Globus Auth's API error document, as in globus-sdk's registered 401 response."""
    title = HTTPStatus(status).phrase
    error = {"status": str(int(status)), "id": str(uuid.uuid4()), "code": code, "detail": detail, "title": title}
    return _json(status, {"errors": [error], "error_description": title, "error": code.lower()})


_NOT_AUTHENTICATED = ("UNAUTHORIZED", "Call must be authenticated")
_SERVICE_UNAVAILABLE_PAGE = (
    b"<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n<body>\r\n"
    b"<center><h1>503 Service Temporarily Unavailable</h1></center>\r\n</body>\r\n</html>\r\n"
)


def _fault_response(fault: Fault) -> Response:
    # What a load balancer in front of a down service sends: an HTML page, not the API's JSON.
    assert fault.status is not None
    body = _SERVICE_UNAVAILABLE_PAGE if fault.status == 503 else HTTPStatus(fault.status).phrase.encode()
    headers: list[Header] = [(b"content-type", b"text/html")]
    if fault.retry_after is not None:
        headers.append((b"retry-after", str(fault.retry_after).encode()))
    return Response(fault.status, body, tuple(headers))


def _basic_credentials(headers: Mapping[bytes, bytes]) -> tuple[str, str] | None:
    scheme, _, encoded = headers.get(b"authorization", b"").partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


def _bearer(headers: Mapping[bytes, bytes]) -> str | None:
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    return token.decode("utf-8", "replace") if scheme.lower() == b"bearer" and token else None


async def _pause(receive: Receive, seconds: float) -> bool:
    """Sleep `seconds` unless the client leaves first; True when it is still there to answer."""
    if not seconds:
        return True
    try:
        await asyncio.wait_for(asgi.wait_disconnect(receive), seconds)
    except TimeoutError:
        return True
    return False


async def _send(send: Send, response: Response) -> None:
    await asgi.send_response(send, response.status, response.body, response.headers)


# --- the app ----------------------------------------------------------------------------------


@dataclass(slots=True)
class FakeStats:
    """Served at /fake/stats. Real routes are counted on arrival, so failed and retried calls count too."""

    requests: Counter[str] = field(default_factory=Counter)  # "POST /v2/oauth2/token/introspect" -> calls
    grants: Counter[str] = field(default_factory=Counter)  # grant_type -> calls to /v2/oauth2/token
    introspections: Counter[str] = field(default_factory=Counter)  # token_id(token) -> calls
    in_flight: int = 0
    max_in_flight: int = 0


Handler = Callable[[Request], Response]
_TOKENS_PREFIX = "/fake/tokens/"


class FakeGlobus(asgi.App):
    """The ASGI app. Build it with `create_app`; its state lives in memory until /fake/reset."""

    def __init__(self, config: FakeGlobusConfig) -> None:
        self.config = config
        self.stats = FakeStats()
        self._grants: dict[str, Grant] = {}
        self._refresh_tokens: dict[str, str] = {}  # refresh token -> the access token it last issued
        self._faults: dict[str, Fault] = {}
        self._real: dict[str, dict[str, Handler]] = {
            "/v2/oauth2/token/introspect": {"POST": self._introspect},
            "/v2/oauth2/token": {"POST": self._token},
            "/v2/oauth2/token/revoke": {"POST": self._revoke},
            "/v2/groups/my_groups": {"GET": self._my_groups},
        }
        self._control: dict[str, dict[str, Handler]] = {
            "/fake/tokens": {"POST": self._register},
            "/fake/faults": {"POST": self._set_fault, "DELETE": self._clear_faults},
            "/fake/stats": {"GET": self._stats},
            "/fake/reset": {"POST": self._reset},
        }

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(
            method=scope["method"],
            path=scope["path"],
            headers=dict(scope["headers"]),
            query=_first_values(scope["query_string"].decode("latin-1")),
            body=await asgi.read_body(receive),
        )
        if request.path in self._real:
            response = await self._serve_real(request, receive)
            if response is not None:
                await _send(send, response)
            return
        await _send(send, self._serve_control(request))

    async def _serve_real(self, request: Request, receive: Receive) -> Response | None:
        """Answer a Globus route after latency and faults; None once the client has given up."""
        methods = self._real[request.path]
        if request.method not in methods:
            return _method_not_allowed(methods)
        stats = self.stats
        stats.requests[f"{request.method} {request.path}"] += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            fault = self._faults.get("groups" if request.path.startswith("/v2/groups/") else "auth")
            delay = self.config.latency + (fault.delay if fault else 0.0)
            if not await _pause(receive, delay):
                return None
            if fault and fault.status is not None:
                return _fault_response(fault)
            return methods[request.method](request)
        finally:
            stats.in_flight -= 1

    def _serve_control(self, request: Request) -> Response:
        path = request.path
        if path.startswith(_TOKENS_PREFIX):
            methods: dict[str, Handler] = {"DELETE": self._revoke_registered}
        else:
            methods = self._control.get(path, {})
        if not methods:
            return Response(HTTPStatus.NOT_FOUND, asgi.NOT_FOUND, (asgi.JSON_TYPE,))
        handler = methods.get(request.method)
        if handler is None:
            return _method_not_allowed(methods)
        try:
            return handler(request)
        except ControlError as error:
            return _json(HTTPStatus.BAD_REQUEST, {"detail": str(error)})

    # --- Globus Auth ----------------------------------------------------------------------------

    def _confidential_client(self, request: Request) -> str | None:
        """The client id proven by HTTP Basic credentials, or None."""
        credentials = _basic_credentials(request.headers)
        if credentials is None:
            return None
        client_id, secret = credentials
        known = self.config.clients.get(client_id)
        matches = known is not None and hmac.compare_digest(known.encode(), secret.encode())
        return client_id if matches else None

    def _active_grant(self, token: str | None) -> Grant | None:
        grant = self._grants.get(token) if token else None
        return grant if grant is not None and grant.active(time.time()) else None

    def _introspect(self, request: Request) -> Response:
        client_id = self._confidential_client(request)
        if client_id is None:
            return _auth_error(HTTPStatus.UNAUTHORIZED, *_NOT_AUTHENTICATED)
        form = request.form()
        token = form.get("token")
        if not token:
            return _auth_error(HTTPStatus.BAD_REQUEST, "BAD_REQUEST", "Missing required parameter: token")
        self.stats.introspections[token_id(token)] += 1
        grant = self._active_grant(token)
        # Globus only describes a token to a client in its audience; to others it is just inactive.
        if grant is None or client_id not in grant.audience:
            return _json(HTTPStatus.OK, {"active": False})
        include = set(_split(form.get("include")))
        return _json(HTTPStatus.OK, _introspection(grant, include, _split(form.get("authentication_policies"))))

    def _token(self, request: Request) -> Response:
        form = request.form()
        grant_type = form.get("grant_type", "")
        self.stats.grants[grant_type] += 1
        if grant_type == "client_credentials":
            return self._client_credentials(request, form)
        if grant_type == DEPENDENT_TOKEN_GRANT:
            return self._dependent_tokens(request, form)
        if grant_type == "refresh_token":
            return self._refresh(request, form)
        return _oauth_error(HTTPStatus.BAD_REQUEST, "unsupported_grant_type")

    def _client_credentials(self, request: Request, form: Mapping[str, str]) -> Response:
        """A confidential client's own tokens, one per resource server: the first in the body, the rest in
        `other_tokens`, as Globus answers."""
        client_id = self._confidential_client(request)
        if client_id is None:
            return _oauth_error(HTTPStatus.UNAUTHORIZED, "invalid_client")
        scopes = form.get("scope", "").split()
        if not scopes or any(scope not in _CLIENT_RESOURCE_SERVERS for scope in scopes):
            return _oauth_error(HTTPStatus.BAD_REQUEST, "invalid_scope")
        now = int(time.time())
        identity = _client_identity(client_id, None)
        bodies = []
        for resource_server in dict.fromkeys(_CLIENT_RESOURCE_SERVERS[scope] for scope in scopes):
            granted = " ".join(scope for scope in scopes if _CLIENT_RESOURCE_SERVERS[scope] == resource_server)
            grant = Grant(
                token=secrets.token_urlsafe(32),
                client_id=client_id,
                scope=granted,
                resource_server=resource_server,
                audience=(resource_server,),
                issued_at=now,
                expires_at=now + self.config.token_lifetime,
                identities=(identity,),
                session_id=None,
                authentications=(),
                groups=(),
                policies={},
                dependent_scopes=(),
            )
            self._grants[grant.token] = grant
            bodies.append(self._token_body(grant))
        return _json(HTTPStatus.OK, {**bodies[0], "other_tokens": bodies[1:]})

    def client_of(self, token: str | None, resource_server: str) -> str | None:
        """For a fake resource server in this process: the client an active token for it was issued to."""
        grant = self._active_grant(token)
        return grant.client_id if grant is not None and grant.resource_server == resource_server else None

    def _dependent_tokens(self, request: Request, form: Mapping[str, str]) -> Response:
        client_id = self._confidential_client(request)
        if client_id is None:
            return _oauth_error(HTTPStatus.UNAUTHORIZED, "invalid_client")
        grant = self._active_grant(form.get("token"))
        if grant is None or client_id not in grant.audience:
            return _oauth_error(HTTPStatus.BAD_REQUEST, "invalid_grant")
        wanted = set(form.get("scope", "").split())
        scopes = [scope for scope in grant.dependent_scopes if not wanted or scope in wanted]
        offline = form.get("access_type") == "offline"
        # Like Globus, a list with one token per resource server, not the usual token document.
        return _json(HTTPStatus.OK, [self._issue_dependent(grant, scope, offline=offline) for scope in scopes])

    def _issue_dependent(self, parent: Grant, scope: str, *, offline: bool) -> JSON:
        now = int(time.time())
        resource_server = _DEPENDENT_RESOURCE_SERVERS[scope]
        grant = replace(
            parent,
            token=secrets.token_urlsafe(32),
            scope=scope,
            resource_server=resource_server,
            audience=(resource_server,),
            issued_at=now,
            expires_at=now + self.config.token_lifetime,
            dependent_scopes=(),
        )
        self._grants[grant.token] = grant
        body = self._token_body(grant)
        if offline:
            body["refresh_token"] = self._new_refresh_token(grant)
        return body

    def _refresh(self, request: Request, form: Mapping[str, str]) -> Response:
        credentials = _basic_credentials(request.headers)
        client_id = self._confidential_client(request) if credentials else form.get("client_id")
        if not client_id:
            return _oauth_error(HTTPStatus.UNAUTHORIZED, "invalid_client")
        refresh_token = form.get("refresh_token", "")
        last = self._grants.get(self._refresh_tokens.get(refresh_token, ""))
        if last is None or last.client_id != client_id:
            return _oauth_error(HTTPStatus.BAD_REQUEST, "invalid_grant")
        now = int(time.time())
        grant = replace(
            last, token=secrets.token_urlsafe(32), issued_at=now, expires_at=now + self.config.token_lifetime
        )
        self._grants[grant.token] = grant
        self._refresh_tokens[refresh_token] = grant.token
        return _json(HTTPStatus.OK, {**self._token_body(grant), "refresh_token": refresh_token, "other_tokens": []})

    def _token_body(self, grant: Grant) -> JSON:
        return {
            "access_token": grant.token,
            "expires_in": grant.expires_at - grant.issued_at,
            "resource_server": grant.resource_server,
            "scope": grant.scope,
            "token_type": "Bearer",
        }

    def _new_refresh_token(self, grant: Grant) -> str:
        refresh_token = secrets.token_urlsafe(48)
        self._refresh_tokens[refresh_token] = grant.token
        return refresh_token

    def _revoke(self, request: Request) -> Response:
        form = request.form()
        # Confidential clients authenticate; native apps only name themselves in the body.
        if _basic_credentials(request.headers) and self._confidential_client(request) is None:
            return _oauth_error(HTTPStatus.UNAUTHORIZED, "invalid_client")
        token = form.get("token", "")
        grant = self._grants.get(token)
        if grant is not None:
            self._grants[token] = replace(grant, revoked=True)
        self._refresh_tokens.pop(token, None)
        return _json(HTTPStatus.OK, {"active": False})

    # --- Globus Groups --------------------------------------------------------------------------

    def _my_groups(self, request: Request) -> Response:
        grant = self._active_grant(_bearer(request.headers))
        if grant is None or GROUPS_SCOPE not in grant.scope.split():
            return _json(HTTPStatus.UNAUTHORIZED, {"detail": "Invalid or expired token"})
        statuses = set(_split(request.query.get("statuses"))) or {"active"}
        unknown = statuses - _MEMBERSHIP_STATUSES
        if unknown:
            return _json(HTTPStatus.UNPROCESSABLE_ENTITY, {"detail": f"Invalid statuses: {', '.join(sorted(unknown))}"})
        return _json(HTTPStatus.OK, [_group_body(g, grant) for g in grant.groups if g.status in statuses])

    # --- control routes -------------------------------------------------------------------------

    def _register(self, request: Request) -> Response:
        body = request.json()
        if not isinstance(body, dict):
            raise ControlError("body must be a JSON object")
        now = int(time.time())
        grant = parse_grant(body, default_audience=next(iter(self.config.clients)), now=now)
        self._grants[grant.token] = grant
        refresh_token = self._new_refresh_token(grant)
        reply = {"token": grant.token, "sub": grant.subject.id, "exp": grant.expires_at, "refresh_token": refresh_token}
        return _json(HTTPStatus.CREATED, reply)

    def _revoke_registered(self, request: Request) -> Response:
        token = request.path.removeprefix(_TOKENS_PREFIX)
        grant = self._grants.get(token)
        if grant is None:
            return _json(HTTPStatus.NOT_FOUND, {"detail": "unknown token"})
        self._grants[token] = replace(grant, revoked=True)
        return Response(HTTPStatus.NO_CONTENT)

    def _set_fault(self, request: Request) -> Response:
        services, fault = parse_fault(request.json())
        for service in services:
            self._faults[service] = fault
        return _json(HTTPStatus.OK, {name: active.wire() for name, active in self._faults.items()})

    def _clear_faults(self, request: Request) -> Response:
        self._faults.clear()
        return Response(HTTPStatus.NO_CONTENT)

    def _stats(self, request: Request) -> Response:
        return _json(HTTPStatus.OK, self.stats)

    def _reset(self, request: Request) -> Response:
        self._grants.clear()
        self._refresh_tokens.clear()
        self._faults.clear()
        self.stats = FakeStats()
        return Response(HTTPStatus.NO_CONTENT)


def _method_not_allowed(methods: Mapping[str, Handler]) -> Response:
    return Response(
        HTTPStatus.METHOD_NOT_ALLOWED, asgi.METHOD_NOT_ALLOWED, (asgi.JSON_TYPE, asgi.allow_header(methods))
    )


# --- command line -----------------------------------------------------------------------------


def _client(value: str) -> tuple[str, str]:
    client_id, sep, secret = value.partition(":")
    if not (client_id and sep and secret):
        raise argparse.ArgumentTypeError("expected CLIENT_ID:SECRET")
    return client_id, secret


def main(argv: Sequence[str] | None = None) -> None:
    parser = asgi.command_line(
        prog="python -m fakes.globus",
        description="A fake Globus Auth + Groups server for globus-sdk (register tokens at POST /fake/tokens).",
        port=8002,
    )
    parser.add_argument(
        "--client",
        dest="clients",
        type=_client,
        action="append",
        metavar="CLIENT_ID:SECRET",
        help=f"a confidential client (the gateway); repeatable (default: {DEMO_CLIENT_ID}:{DEMO_CLIENT_SECRET})",
    )
    parser.add_argument("--latency", type=float, default=0.0, metavar="S", help="delay of every Globus route")
    parser.add_argument("--token-lifetime", type=int, default=TOKEN_LIFETIME, metavar="S")
    options = parser.parse_args(argv)
    try:
        config = FakeGlobusConfig(
            clients=dict(options.clients) if options.clients else FakeGlobusConfig().clients,
            latency=options.latency,
            token_lifetime=options.token_lifetime,
        )
    except ValueError as error:
        parser.error(str(error))
    banner = f"fake Globus Auth + Groups on http://{options.host}:{options.port}/"
    asgi.serve(create_app(config), host=options.host, port=options.port, banner=banner)


if __name__ == "__main__":
    main()
