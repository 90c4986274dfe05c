"""Who am I, and my API keys (created with a Globus token, for long-running workflows)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from asgiref.sync import sync_to_async
from django.http import HttpRequest
from ninja import Field, Path, Router, Schema

from resource_server.api.openapi import AUTHENTICATED, REQUEST_ID_HEADER, documented
from resource_server.api.security import bearer_auth, bearer_token
from resource_server.auth.base import AuthKind, Principal
from resource_server.models import ApiKey
from resource_server.selectors.api_keys import api_key_list
from resource_server.services.api_keys import api_key_issue, api_key_revoke_own

router = Router(auth=bearer_auth, tags=["Account"])


class WhoAmI(Schema):
    identity_id: str
    username: str
    auth_kind: str = Field(description="`globus` (a user's token), `service` (a client's token) or `api_key`.")
    groups: list[str]
    # FIRST's fields, for its users' scripts (the same facts under FIRST's names).
    id: str = Field(description="FIRST's name for `identity_id`.")
    name: str = Field(description="Your name, as your identity provider gave it.")
    user_group_uuids: list[str] = Field(description="FIRST's name for `groups`.")
    idp_id: str = Field(description="Your identity provider's Globus id (empty when you use an API key).")
    idp_name: str = Field(description="Your identity provider's name (`local` for accounts made on the gateway).")
    auth_service: str = Field(description="`globus` for Globus tokens, `api_key` for gateway API keys.")

    @staticmethod
    def of(principal: Principal) -> WhoAmI:
        groups = sorted(principal.groups)
        return WhoAmI(
            identity_id=principal.identity_id,
            username=principal.username,
            auth_kind=principal.auth_kind.value,
            groups=groups,
            id=principal.identity_id,
            name=principal.name,
            user_group_uuids=groups,
            idp_id=principal.identity_provider_id,
            idp_name=principal.identity_provider,
            auth_service="api_key" if principal.auth_kind is AuthKind.API_KEY else "globus",
        )


class ApiKeyCreate(Schema):
    name: str = Field(min_length=1, max_length=100, description="A label for you, e.g. the workflow's name.")
    expires_in_days: int | None = Field(
        default=None, ge=1, le=3650, description="Days until the key stops working; none: it never expires."
    )


class ApiKeyOut(Schema):
    id: str = Field(description="The key's visible prefix; use it to revoke the key.")
    name: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    @staticmethod
    def of(key: ApiKey) -> ApiKeyOut:
        return ApiKeyOut(
            id=key.prefix,
            name=key.name,
            created_at=key.created_at,
            expires_at=key.expires_at,
            revoked_at=key.revoked_at,
            last_used_at=key.last_used_at,
        )


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="The whole key. It is shown only this once.")


class ApiKeyList(Schema):
    object: str = "list"
    data: list[ApiKeyOut]


def _principal(request: HttpRequest) -> Principal:
    principal: Principal = request.auth  # type: ignore[attr-defined]
    return principal


def _ok(description: str) -> dict[str, object]:
    return {"description": description, "headers": REQUEST_ID_HEADER}


KeyId = Annotated[str, Path(..., description="The key's `id` (its visible prefix).", example="igw_0123456789ab")]


@router.get(
    "/whoami",
    response=WhoAmI,
    summary="Who the gateway thinks you are",
    operation_id="whoami",
    openapi_extra=documented(
        "The identity, username and groups the gateway sees in your credentials, and which kind they are "
        "(Globus token or API key). Useful to check a token before a long workflow. FIRST's fields (`id`, "
        "`name`, `username`, `user_group_uuids`, `idp_id`, `idp_name`, `auth_service`) are there too.",
        *AUTHENTICATED,
        ok=_ok("Your identity."),
    ),
)
async def whoami(request: HttpRequest) -> WhoAmI:
    return WhoAmI.of(_principal(request))


_CREATE = documented(
    "Creates a gateway API key for your identity, for workflows that run longer than a Globus token lives. "
    "Authenticate with a Globus access token: an API key cannot create keys (403 `api_key_not_allowed`). "
    "The whole key is in the answer only this once; store it like a password.",
    "400",
    "413",
    *AUTHENTICATED,
    ok=_ok("The new key, with its secret."),
    status=201,
)
_CREATE["requestBody"] = {"content": {"application/json": {"example": {"name": "nightly-eval", "expires_in_days": 90}}}}


@router.post(
    "/v1/api-keys",
    response={201: ApiKeyCreated},
    summary="Create an API key",
    operation_id="api_key_create",
    openapi_extra=_CREATE,
)
async def create_api_key(request: HttpRequest, payload: ApiKeyCreate) -> tuple[int, ApiKeyCreated]:
    key, secret = await api_key_issue(
        principal=_principal(request),
        token=bearer_token(request),
        name=payload.name,
        expires_in_days=payload.expires_in_days,
    )
    return 201, ApiKeyCreated(**ApiKeyOut.of(key).model_dump(), key=secret)


@router.get(
    "/v1/api-keys",
    response=ApiKeyList,
    summary="List your API keys",
    operation_id="api_key_list",
    openapi_extra=documented(
        "Your API keys, revoked and expired ones included, without their secrets.",
        *AUTHENTICATED,
        ok=_ok("Your keys."),
    ),
)
async def list_api_keys(request: HttpRequest) -> ApiKeyList:
    keys = await sync_to_async(api_key_list)(principal=_principal(request))
    return ApiKeyList(data=[ApiKeyOut.of(key) for key in keys])


@router.delete(
    "/v1/api-keys/{key_id}",
    response=ApiKeyOut,
    summary="Revoke one of your API keys",
    operation_id="api_key_revoke",
    openapi_extra=documented(
        "Revokes one of your keys at once; requests that use it are refused from then on (401 `revoked_api_key`).",
        *AUTHENTICATED,
        "404",
        ok=_ok("The revoked key."),
    ),
)
async def revoke_api_key(request: HttpRequest, key_id: KeyId) -> ApiKeyOut:
    key = await sync_to_async(api_key_revoke_own)(principal=_principal(request), key_id=key_id)
    return ApiKeyOut.of(key)
