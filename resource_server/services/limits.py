"""Setting limits and budgets from scripts (`python manage.py set_limit`); the admin edits the same rows."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from resource_server.models import ApiKey, Endpoint, Limit, Project, User

# The limits of a Limit row, with how each reads in words (after its number).
LIMIT_FIELDS: dict[str, str] = {
    "concurrent": "concurrent requests",
    "requests_per_minute": "requests per minute",
    "tokens_per_minute": "tokens per minute",
    "tokens_per_day": "tokens per UTC day",
    "tokens_per_month": "tokens per UTC month",
    "allocation_tokens": "tokens in the allocation",
}


@dataclass(frozen=True, slots=True)
class LimitChange:
    """What `limit_set` did: the limit as it now stands (None: the scope has none left), and in words."""

    limit: Limit | None
    action: str  # "created", "updated", "deleted", "unchanged"
    description: str


def _when(moment: datetime | None) -> str:
    return "?" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def limit_describe(limit: Limit) -> str:
    """The limit in words: its scope, narrowing and each limit it sets, e.g. "user ada@anl.gov on model m:
    4 concurrent requests, 1,000,000 tokens per UTC day"."""
    parts = []
    for field, words in LIMIT_FIELDS.items():
        value = getattr(limit, field)
        if value is None:
            continue
        if field == "allocation_tokens":
            words += f" from {_when(limit.allocation_starts)} to {_when(limit.allocation_ends)}"
        parts.append(f"{value:,} {words}")
    return f"{limit}: {', '.join(parts) if parts else 'no limit'}"


def _user_named(username: str) -> User:
    user = User.objects.filter(username=username).first()
    if user is None:
        raise ValidationError(
            f"No user is named {username!r} (a user exists once they have signed in or been given a key)."
        )
    return user


def _key_of(prefix: str) -> ApiKey:
    key = ApiKey.objects.select_related("owner").filter(prefix=prefix).first()
    if key is None:
        raise ValidationError(f"No API key has the prefix {prefix!r} (the visible part the admin's key list shows).")
    return key


def _project_named(name_or_group: str, new_name: str | None) -> Project:
    """A project by its name or its Globus group's UUID; for a group with no project yet, one named `new_name`."""
    try:
        group: uuid.UUID | None = uuid.UUID(name_or_group)
    except ValueError:
        group = None
    project = (
        Project.objects.filter(globus_group=group).first()
        if group is not None
        else Project.objects.filter(name=name_or_group).first()
    )
    if project is not None:
        if new_name and new_name != project.name:
            raise ValidationError(
                f"Group {project.globus_group} is project {project.name!r} already: a project name is only given to "
                "create a project (rename it in the admin)."
            )
        return project
    if group is None:
        raise ValidationError(
            f"No project is named {name_or_group!r}. Give its Globus group's UUID to refer to it by group."
        )
    if not new_name:
        raise ValidationError(
            f"No project has the Globus group {group}: give the new project a name (--project-name) to create it."
        )
    project = Project(name=new_name, globus_group=group)
    project.full_clean()
    project.save()
    return project


def _endpoint_numbered(endpoint_id: int) -> Endpoint:
    endpoint = Endpoint.objects.filter(pk=endpoint_id).first()
    if endpoint is None:
        raise ValidationError(f"No endpoint has the id {endpoint_id} (the number in its admin page's address).")
    return endpoint


@transaction.atomic
def limit_set(
    *,
    user: str | None = None,
    key: str | None = None,
    project: str | None = None,
    project_name: str | None = None,
    everyone: bool = False,
    model: str = "",
    endpoint: int | None = None,
    values: dict[str, int] | None = None,
    allocation_starts: datetime | None = None,
    allocation_ends: datetime | None = None,
    note: str | None = None,
    exempt: bool | None = None,
) -> LimitChange:
    """Create, change or delete the one Limit of a scope (a username, a key prefix, a project's name or Globus
    group UUID, or everyone) and narrowing (a model name or an endpoint id, or neither).

    `values` maps fields of LIMIT_FIELDS to a number: the new limit, or 0 to remove it; fields not given keep
    their value. Removing `allocation_tokens` removes its period too. A Limit left with no limit is deleted.
    `exempt` (user scope only) makes the user a service account that no limit applies to, or not.
    Raises ValidationError saying what is wrong (unknown user, key, project or endpoint; negative numbers;
    an inconsistent limit)."""
    values = values or {}
    if sum([user is not None, key is not None, project is not None, everyone]) != 1:
        raise ValidationError("Choose exactly one scope: a user, an API key, a project, or everyone.")
    if project_name is not None and project is None:
        raise ValidationError("A project name is only given with a project's Globus group UUID.")
    if exempt is not None and user is None:
        raise ValidationError("Only a user can be exempt from limits (a service account).")
    if model and endpoint is not None:
        raise ValidationError("Narrow the limit to a model or to an endpoint, not both.")
    for field, value in values.items():
        if field not in LIMIT_FIELDS:
            raise ValidationError(f"{field} is not a limit; the limits are {', '.join(LIMIT_FIELDS)}.")
        if value < 0:
            raise ValidationError(f"{field} must be 0 (to remove it) or more, not {value}.")
    model = model.strip()
    if model and not Endpoint.objects.filter(model=model).exists():
        raise ValidationError(f"No endpoint serves the model {model!r}: register it first, or check the spelling.")

    scope = Limit(
        user=_user_named(user) if user is not None else None,
        api_key=_key_of(key) if key is not None else None,
        project=_project_named(project, project_name) if project is not None else None,
        everyone=everyone,
        model=model,
        endpoint=_endpoint_numbered(endpoint) if endpoint is not None else None,
    )
    if exempt is not None and scope.user is not None and scope.user.limits_exempt != exempt:
        scope.user.limits_exempt = exempt
        scope.user.save(update_fields=["limits_exempt"])

    limit = (
        # No ordering: the model's orders by related names, and PostgreSQL locks no row through an outer join.
        Limit.objects.select_for_update()
        .order_by()
        .filter(
            user=scope.user,
            api_key=scope.api_key,
            project=scope.project,
            everyone=everyone,
            model=model,
            endpoint=scope.endpoint,
        )
        .first()
    )
    created = limit is None
    if limit is None:
        limit = scope
    changed = False
    for field, value in values.items():
        new = value or None
        changed |= getattr(limit, field) != new
        setattr(limit, field, new)
    if values.get("allocation_tokens") == 0:
        changed |= limit.allocation_starts is not None or limit.allocation_ends is not None
        limit.allocation_starts = limit.allocation_ends = None
    for field, moment in (("allocation_starts", allocation_starts), ("allocation_ends", allocation_ends)):
        if moment is not None:
            changed |= getattr(limit, field) != moment
            setattr(limit, field, moment)
    if note is not None:
        changed |= limit.note != note
        limit.note = note

    exemption = ""
    if scope.user is not None and scope.user.limits_exempt:
        exemption = f"; {scope.user} is exempt from every limit (a service account)"
    if all(getattr(limit, field) is None for field in LIMIT_FIELDS):
        if limit.allocation_starts is not None or limit.allocation_ends is not None:
            raise ValidationError("An allocation period needs its tokens (allocation_tokens).")
        if not created:
            limit.delete()
            return LimitChange(None, "deleted", limit_describe(scope) + exemption)
        return LimitChange(None, "unchanged", limit_describe(scope) + exemption)
    if limit.allocation_tokens is None and (limit.allocation_starts is not None or limit.allocation_ends is not None):
        raise ValidationError("An allocation period needs its tokens (allocation_tokens).")
    if not changed:
        return LimitChange(limit, "unchanged", limit_describe(limit) + exemption)
    limit.full_clean()
    try:
        with transaction.atomic():
            limit.save()
    except IntegrityError:
        # Another change created the same scope and narrowing's row after this one looked (the unique constraint).
        raise ValidationError(
            "The limit was changed at the same time by someone else: run the command again."
        ) from None
    return LimitChange(limit, "created" if created else "updated", limit_describe(limit) + exemption)
