"""Users known to the gateway, kept in step with the identities Globus Auth reports."""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import DatabaseError, transaction

from resource_server.auth.base import Identity, Principal
from resource_server.cache import LocalTTLCache
from resource_server.db import db_run
from resource_server.errors import ErrorCode, ServiceUnavailable
from resource_server.models import LOCAL_PROVIDER, User

logger = logging.getLogger(__name__)


@transaction.atomic
def user_upsert(*, identity_id: str, username: str, name: str, identity_provider: str) -> User:
    """Create or refresh the user behind a Globus identity; the identity id is what never changes.

    A local account an admin created under the same username (for example with `create_api_key`)
    is adopted, so its keys and usage carry over. If another identity still holds the username
    (an identity provider reassigned it), that older row keeps its history under a suffixed name.
    """
    user = User.objects.select_for_update().filter(identity_id=identity_id).first()
    if user is None:
        user = (
            User.objects.select_for_update().filter(username=username, identity_provider=LOCAL_PROVIDER).first()
        ) or User(identity_id=identity_id)
    holder = User.objects.select_for_update().filter(username=username).exclude(pk=user.pk).first()
    if holder is not None:
        holder.username = f"{username}#{holder.identity_id}"[:255]
        holder.save(update_fields=["username"])
    user.identity_id = identity_id
    user.username = username
    user.name = name
    user.identity_provider = identity_provider
    user.save()
    return user


class UserPrincipals:
    """The Principal for an identity an identity provider vouched for, its user upserted (`PrincipalSource`).

    If the database cannot be reached, a user this instance upserted within AUTH_OUTAGE_GRACE_SECONDS is
    used as it was (name changes wait for the next successful check); others get a 503.
    """

    def __init__(self) -> None:
        # identity id -> user id, from the last successful upsert: what a database outage falls back on.
        self._users: LocalTTLCache[tuple[int, bool]] = LocalTTLCache()

    async def principal(self, identity: Identity) -> Principal:
        user_id, limits_exempt = await self._user(identity)
        return Principal(
            user_id=user_id,
            limits_exempt=limits_exempt,
            identity_id=identity.identity_id,
            username=identity.username,
            auth_kind=identity.auth_kind,
            groups=identity.groups,
            name=identity.name,
            identity_provider=identity.identity_provider,
            identity_provider_id=identity.identity_provider_id,
        )

    async def _user(self, identity: Identity) -> tuple[int, bool]:
        """The user's id and whether it is exempt from limits."""
        try:
            user = await db_run(
                user_upsert,
                identity_id=identity.identity_id,
                username=identity.username,
                name=identity.name,
                identity_provider=identity.identity_provider,
            )
        except DatabaseError:
            known = self._users.get(identity.identity_id)
            if known is None:
                raise ServiceUnavailable(
                    "The gateway cannot check credentials right now. Please retry shortly.",
                    retry_after=5,
                    code=ErrorCode.AUTH_UNAVAILABLE,
                ) from None
            logger.warning("database unreachable; using the user this worker knew for a Globus identity")
            return known
        self._users.set(identity.identity_id, (user.pk, user.limits_exempt), settings.GATEWAY.AUTH_OUTAGE_GRACE_SECONDS)
        return user.pk, user.limits_exempt
