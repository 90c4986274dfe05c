"""The chaos run's bookkeeping: how an exchange is classed, how rows are matched, when a fault is over."""

from __future__ import annotations

import psycopg
import pytest
from django.db import connection

from benchmarks.chaos import CUT, ERROR_EVENT, OK, Shot, healthy_since, outcome_of, rows_again, tabulate, usage_rows
from resource_server.models import RequestLog, User
from tests.servers import server_database_url

DONE = b"data: [DONE]\n\n"
TOKEN = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
ERROR = b'data: {"error":{"message":"m","type":"upstream_error","param":null,"code":"relay_failed"}}\n\n'


def shot(index: int, outcome: str = OK, *, sent: float = 0.0, finished: float | None = 1.0, code: str = "") -> Shot:
    made = Shot(index, "chat", f"id-{index}", sent, finished=finished, outcome=outcome, code=code)
    made.status = 0 if outcome in {"timeout", "reset", "refused"} else 200
    return made


def test_a_stream_is_ok_only_when_it_ends_with_done_and_carries_no_error_event() -> None:
    assert outcome_of(200, True, TOKEN + DONE, "") == (OK, "")
    assert outcome_of(200, True, TOKEN + ERROR + DONE, "") == (ERROR_EVENT, "relay_failed")
    assert outcome_of(200, True, TOKEN, "") == (CUT, "")
    assert outcome_of(200, True, TOKEN + TOKEN, "reset") == (CUT, "")
    assert outcome_of(200, True, TOKEN + DONE, "timeout") == (CUT, "")
    assert outcome_of(200, True, TOKEN + TOKEN + DONE, "", tokens=2) == (OK, "")
    assert outcome_of(200, True, TOKEN + DONE, "", tokens=2) == (CUT, "short"), "ended early as if complete"


def test_error_answers_are_classed_by_status_with_their_code() -> None:
    body = b'{"error":{"message":"m","type":"service_unavailable","param":null,"code":"auth_unavailable"}}'
    assert outcome_of(503, False, body, "") == ("503", "auth_unavailable")
    assert outcome_of(404, False, b'{"error":{"code":"model_not_found"}}', "") == ("4xx", "model_not_found")
    assert outcome_of(500, False, b"Internal Server Error", "") == ("5xx", "")
    assert outcome_of(0, False, b"", "timeout") == ("timeout", "")


def test_rows_are_owed_for_answers_only_and_counted_once_each() -> None:
    shots = [
        shot(0),
        shot(1),  # no row: missing
        shot(2, CUT),  # two rows: one duplicate
        shot(3, "503", code="auth_unavailable"),  # refused before authentication: nothing owed
        shot(4, "timeout"),  # unanswered, yet recorded
        shot(5, "503", code="no_endpoint_ready"),  # owed, missing
    ]
    tally = tabulate(shots, {"id-0": 1, "id-2": 2, "id-4": 1})
    assert tally.sent == 6
    assert tally.before_auth == 1
    assert (tally.rows_expected, tally.rows_found, tally.missing) == (4, 2, 2)
    assert tally.duplicates == 1
    assert tally.unanswered_with_row == 1
    assert tally.missing_by == {"200 ok": 1, "503 no_endpoint_ready": 1}
    assert tally.outcomes == {OK: 2, CUT: 1, "503": 2, "timeout": 1}


def test_recovery_starts_after_the_last_failure_and_waits_for_hanging_requests() -> None:
    shots = [
        shot(0, "503", sent=9.0),  # before the fault was lifted at 10: not judged
        shot(1, "503", sent=10.5),
        shot(2, OK, sent=11.0),
        shot(3, "503", sent=11.5),
        shot(4, OK, sent=12.0),
        shot(5, OK, sent=12.5),
    ]
    assert healthy_since(shots, 10.0, 20.0, settle=6.0) == 12.0
    hanging = [*shots, shot(6, "", sent=13.0, finished=None)]
    assert healthy_since(hanging, 10.0, 15.0, settle=6.0) == 12.0, "too young to judge"
    assert healthy_since(hanging, 10.0, 19.5, settle=6.0) is None, "open for longer than settle: it hangs"
    assert healthy_since(shots[:2], 10.0, 20.0, settle=6.0) is None


def test_rows_are_written_again_at_the_first_sample_above_the_count_at_the_lift() -> None:
    samples = [(9.0, 100), (10.0, 120), (10.5, 120), (11.0, 120), (11.5, 121), (12.0, 150)]
    assert rows_again(samples, 10.2) == 11.5
    assert rows_again(samples[:4], 10.2) is None


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(connection.vendor != "postgresql", reason="needs DATABASE_URL pointing at PostgreSQL")
def test_usage_rows_are_counted_in_the_database_by_the_id_the_client_sent() -> None:
    user = User.objects.create(identity_id="id-chaos", username="chaos@example.org")
    # Two requests that reused one id: counted as a duplicate, not merged.
    for index, sent in enumerate(["chaos-1-000001", "chaos-1-000002", "chaos-1-000002", "someone-else"]):
        ids = {"request_id": f"gateway{index:025d}", "client_request_id": sent}
        RequestLog.objects.create(user=user, route="chat/completions", status_code=200, latency_ms=1.0, **ids)
    with psycopg.connect(server_database_url()) as database:
        rows, total = usage_rows(database)
    assert total == 4
    assert (rows["chaos-1-000001"], rows["chaos-1-000002"], rows["chaos-1-000003"]) == (1, 2, 0)
