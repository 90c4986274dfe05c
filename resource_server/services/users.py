"""Users known to the gateway, kept in step with the identities Globus Auth reports."""

from __future__ import annotations

from django.db import transaction

from resource_server.models import User

LOCAL_PROVIDER = "local"


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
