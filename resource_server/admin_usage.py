"""The admin's usage page (Admin > Daily usage): totals per day, user, project and model over a period, drawn as
charts (server-side SVG: no script, nothing from a CDN) and tables, and the same aggregates as CSV.

Read from the daily rollup only (`selectors/usage.py`), so it answers as fast with a hundred million request rows
as with a thousand. The rollup's rows are accounting records: nobody adds, edits or deletes them here.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from datetime import date, timedelta
from typing import Any

from django import forms
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponseBase, StreamingHttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from resource_server.models import UsageDaily
from resource_server.selectors.usage import (
    DIMENSIONS,
    TOP_USERS,
    Dimension,
    UsageFilter,
    UsageLine,
    UsageOverview,
    usage_columns,
    usage_list,
    usage_overview_get,
    usage_row,
)

PERIODS = (7, 30, 90, 365)
DEFAULT_PERIOD = 30
EXPORT_BY: tuple[Dimension, ...] = ("day", "project", "user", "model")


class UsagePageForm(forms.Form):
    days = forms.TypedChoiceField(
        choices=[(str(days), f"last {days} days") for days in PERIODS], coerce=int, required=False
    )
    project = forms.IntegerField(min_value=0, required=False)  # 0: requests charged to no project
    model = forms.CharField(max_length=255, required=False)
    format = forms.ChoiceField(choices=[("html", "page"), ("csv", "CSV")], required=False)
    by = forms.CharField(max_length=100, required=False, help_text=f"CSV: any of {', '.join(DIMENSIONS)}")

    def clean_by(self) -> tuple[Dimension, ...]:
        text = self.cleaned_data["by"]
        if not text:
            return EXPORT_BY
        names = [name.strip() for name in text.split(",")]
        unknown = [name for name in names if name not in DIMENSIONS]
        if unknown:
            raise forms.ValidationError(f"Not a dimension: {', '.join(unknown)}. Use any of {', '.join(DIMENSIONS)}.")
        return tuple(dict.fromkeys(name for name in names if name in DIMENSIONS))

    def usage_filter(self, today: date) -> UsageFilter:
        days = self.cleaned_data["days"] or DEFAULT_PERIOD
        return UsageFilter(
            since=today - timedelta(days=days - 1),
            until=today,
            project_id=self.cleaned_data["project"],
            model=self.cleaned_data["model"] or None,
        )


class UsageRecordsReadOnly:
    """Usage rows and their totals are accounting records: an admin may read them, never add, edit or delete
    one (the request log and the daily rollup)."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class UsageDailyAdmin(UsageRecordsReadOnly, admin.ModelAdmin[UsageDaily]):
    """The usage page in place of a list of rollup rows; no add, change or delete page exists for them."""

    def get_urls(self) -> list[URLPattern]:
        info = self.opts.app_label, self.opts.model_name
        return [path("", self.admin_site.admin_view(self.usage_view), name="{}_{}_changelist".format(*info))]

    def usage_view(self, request: HttpRequest) -> HttpResponseBase:
        if not self.has_view_permission(request):
            raise PermissionDenied
        form = UsagePageForm(request.GET)
        today = timezone.now().date()
        if not form.is_valid():
            return self._page(request, form, None, status=400)
        where = form.usage_filter(today)
        if form.cleaned_data["format"] == "csv":
            by = form.cleaned_data["by"]
            return _csv_response(usage_list(where=where, by=by), by, where)
        return self._page(request, form, usage_overview_get(where=where))

    def _page(
        self, request: HttpRequest, form: UsagePageForm, overview: UsageOverview | None, status: int = 200
    ) -> TemplateResponse:
        context: dict[str, Any] = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Usage",
            "form": form,
            "periods": PERIODS,
            "overview": overview,
        }
        if overview is not None:
            where = overview.where
            context.update(
                days=(where.until - where.since).days + 1,
                tokens_chart=_day_bars(overview.per_day, "total_tokens", "tokens"),
                requests_chart=_day_bars(overview.per_day, "requests", "requests", errors=True),
                users_chart=_user_bars(overview.top_users),
                export=_export_query(request),
                totals=_cells(UsageLine((), overview.totals)),
                tables=[
                    ("Per project", "project", [_cells(line) for line in overview.per_project]),
                    (f"Top {TOP_USERS} users by tokens", "user", [_cells(line) for line in overview.top_users]),
                    ("Per model", "model", [_cells(line) for line in overview.per_model]),
                    ("Per day", "day", [_cells(line) for line in overview.per_day]),
                ],
            )
        return TemplateResponse(request, "admin/resource_server/usagedaily/usage.html", context, status=status)


def _cells(line: UsageLine) -> list[str]:
    """A table row's cells, numbers grouped by thousands."""
    row = usage_row(line)
    sums = len(row) - 6
    return [*(str(value) for value in row[:sums]), *(f"{value:,}" for value in row[sums:-1]), _latency(row[-1])]


def _latency(mean: float | None) -> str:
    return "-" if mean is None else f"{mean:,.1f}"


def _export_query(request: HttpRequest) -> str:
    query = request.GET.copy()
    for name in ("format", "by"):
        query.pop(name, None)
    query["format"] = "csv"
    return query.urlencode()


def _csv_response(lines: list[UsageLine], by: Sequence[Dimension], where: UsageFilter) -> StreamingHttpResponse:
    def rows() -> Iterator[str]:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(usage_columns(by))
        for line in lines:
            writer.writerow(usage_row(line))
            if buffer.tell() > 64 * 1024:
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
        yield buffer.getvalue()

    response = StreamingHttpResponse(rows(), content_type="text/csv; charset=utf-8")
    name = f"usage-{where.since}-{where.until}-by-{'-'.join(by) or 'total'}.csv"
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    return response


# --- charts: inline SVG with presentation attributes only (the admin's CSP allows no inline style or script)

_WIDTH, _HEIGHT, _LEFT, _BOTTOM, _TOP = 900, 180, 70, 22, 8
_BAR, _ERROR, _GRID, _TEXT = "#417690", "#ba2121", "#dddddd", "#666666"


def _day_bars(per_day: list[UsageLine], field: str, unit: str, *, errors: bool = False) -> SafeString:
    """Bars per day, `field` of each; with `errors`, the errors drawn over each bar in red."""
    values = [getattr(line.sums, field) for line in per_day]
    top = max(values, default=0) or 1
    plot_width, plot_height = _WIDTH - _LEFT, _HEIGHT - _BOTTOM - _TOP
    step = plot_width / max(len(per_day), 1)
    parts = []
    for fraction in (0, 0.5, 1):
        y = _TOP + plot_height * (1 - fraction)
        parts.append(
            format_html(
                '<line x1="{}" x2="{}" y1="{}" y2="{}" stroke="{}"/>'
                '<text x="{}" y="{}" text-anchor="end" font-size="11" fill="{}">{}</text>',
                _LEFT,
                _WIDTH,
                f"{y:.1f}",
                f"{y:.1f}",
                _GRID,
                _LEFT - 6,
                f"{y + 4:.1f}",
                _TEXT,
                _short(top * fraction),
            )
        )
    for index, (line, value) in enumerate(zip(per_day, values, strict=True)):
        x = _LEFT + index * step
        height = plot_height * value / top
        tip = f"{line.key[0]}: {value:,} {unit}"
        if errors:
            tip += f", {line.sums.errors:,} errors"
        parts.append(
            format_html(
                '<rect x="{}" y="{}" width="{}" height="{}" fill="{}"><title>{}</title></rect>',
                f"{x:.2f}",
                f"{_TOP + plot_height - height:.2f}",
                f"{max(step * 0.8, 0.5):.2f}",
                f"{height:.2f}",
                _BAR,
                tip,
            )
        )
        if errors and line.sums.errors:
            error_height = plot_height * line.sums.errors / top
            parts.append(
                format_html(
                    '<rect x="{}" y="{}" width="{}" height="{}" fill="{}"><title>{}</title></rect>',
                    f"{x:.2f}",
                    f"{_TOP + plot_height - error_height:.2f}",
                    f"{max(step * 0.8, 0.5):.2f}",
                    f"{error_height:.2f}",
                    _ERROR,
                    tip,
                )
            )
    # The first, middle and last days named under the bars.
    marks = {0: ("start", 0.0), len(per_day) // 2: ("middle", 0.4), len(per_day) - 1: ("end", 0.8)}
    for index, (anchor, offset) in marks.items() if per_day else ():
        parts.append(
            format_html(
                '<text x="{}" y="{}" text-anchor="{}" font-size="11" fill="{}">{}</text>',
                f"{_LEFT + (index + offset) * step:.1f}",
                _HEIGHT - 6,
                anchor,
                _TEXT,
                per_day[index].key[0].isoformat(),
            )
        )
    return _svg(_WIDTH, _HEIGHT, f"{unit.capitalize()} per day", parts)


def _user_bars(top_users: list[UsageLine]) -> SafeString:
    """Horizontal bars: each of the top users' tokens, named."""
    row, label_width = 22, 260
    height = max(row * len(top_users), row) + 4
    top = max((line.sums.total_tokens for line in top_users), default=0) or 1
    plot_width = _WIDTH - label_width - 90
    parts = []
    for index, line in enumerate(top_users):
        y = index * row + 2
        width = plot_width * line.sums.total_tokens / top
        name = str(line.key[0])
        parts.append(
            format_html(
                '<text x="{}" y="{}" text-anchor="end" font-size="12" fill="{}">{}</text>'
                '<rect x="{}" y="{}" width="{}" height="{}" fill="{}"><title>{}: {} tokens, {} requests</title></rect>'
                '<text x="{}" y="{}" font-size="11" fill="{}">{}</text>',
                label_width - 8,
                y + 14,
                _TEXT,
                name if len(name) <= 38 else name[:37] + "\u2026",
                label_width,
                y + 2,
                f"{max(width, 1):.1f}",
                row - 6,
                _BAR,
                name,
                f"{line.sums.total_tokens:,}",
                f"{line.sums.requests:,}",
                f"{label_width + max(width, 1) + 6:.1f}",
                y + 14,
                _TEXT,
                _short(line.sums.total_tokens),
            )
        )
    return _svg(_WIDTH, height, "Top users by tokens", parts)


def _svg(width: int, height: int, label: str, parts: list[SafeString]) -> SafeString:
    return format_html(
        '<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{}" viewBox="0 0 {} {}" width="100%" '
        'preserveAspectRatio="xMinYMin meet">{}</svg>',
        label,
        width,
        height,
        format_html_join("", "{}", ((part,) for part in parts)),
    )


def _short(value: float) -> str:
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}" if value != int(value) else str(int(value))
