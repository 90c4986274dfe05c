"""Limits through the real server, on both counter stores: the issue's "done when" (issue 14).

The gateway runs as deployed with two workers, once counting in Redis (REDIS_URL) and once without it, in the
database the tests use (SQLite, or PostgreSQL with DATABASE_URL). Each behaviour is repeated 20 times:

- 200 concurrent requests against a concurrency limit admit exactly that many;
- 200 concurrent requests against a token budget admit exactly as many reservations as fit, and every one of the
  200 leaves one usage row;
- a budget settles to the tokens used: a request that used fewer than it reserved gives the rest back;
- a worker killed mid-request gives its concurrency slot back once its lease expires.

A round's admitted requests must still hold what they reserved while the others are decided (else a slot or
tokens given back mid-round would let more in). So the model server is reached through a TCP proxy that holds
its answers for the round: admitted requests wait for them, holding their reservations, however long the
refusals take on a slow machine. Once every request is decided (the refusals answered, the admitted ones arrived
at the model server), the proxy lets the answers through and the admitted requests are answered 200. No time is
assumed, beyond generous guards that only stop a broken test from hanging.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest

from benchmarks.loadgen import Connection, Exchange
from resource_server.models import Endpoint, Limit, RequestLog, User
from resource_server.services.api_keys import api_key_create
from resource_server.services.usage import LOST_ERROR_CODE
from tests.conftest import seed
from tests.e2e.conftest import e2e_gateway
from tests.proc import worker_answering, worker_pids, workers_by_client_port
from tests.servers import fake_stats
from tests.tcp_proxy import TcpProxy, proxy_to

pytestmark = pytest.mark.django_db(transaction=True)

CHAT_PATH = "/resource_server/v1/chat/completions"
ROUNDS = 20
CONCURRENT = 200
MAX_TOKENS = 16
# Set to its minimum for these gateways: a killed worker's slots come back within 5 s (its leases are renewed
# every third of it while it lives).
TTL_SECONDS = 5
# Guards against a broken gateway or test hanging the run; never reached when things work.
GUARD_SECONDS = 60


def _body(**extra: Any) -> bytes:
    """A chat request as sent: its size is what the gateway estimates its prompt's tokens from."""
    return orjson.dumps(
        {"model": "demo-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": MAX_TOKENS, **extra}
    )


CHAT = _body()
# What one CHAT reserves from a token budget: its prompt estimated at a token per 4 bytes of body, plus its
# max_tokens (limits/policy.py demand_of). The request uses far fewer (the fake model server counts words).
RESERVED = math.ceil(len(CHAT) / 4) + MAX_TOKENS


@dataclass
class Gateway:
    url: str
    proxy: TcpProxy  # between the gateway and the model server
    model_server: str

    @property
    def workers(self) -> set[int]:
        return worker_pids(self.url)


@pytest.fixture(scope="module")
def proxy(model_server: str) -> Iterator[TcpProxy]:
    with proxy_to(model_server, 80) as tcp:
        yield tcp


@pytest.fixture(scope="module", params=["redis", "database"])
def gateway(
    request: pytest.FixtureRequest, django_db_setup: None, proxy: TcpProxy, model_server: str, tmp_path_factory: Any
) -> Iterator[Gateway]:
    """Two workers counting limits in Redis, or (without REDIS_URL) in the tests' database."""
    redis_url = os.environ.get("REDIS_URL", "")
    if request.param == "redis" and not redis_url:
        pytest.skip("the Redis counter store needs REDIS_URL (CI sets it)")
    with e2e_gateway(
        tmp_path_factory,
        workers=2,
        REDIS_URL=redis_url if request.param == "redis" else "",
        LIMITS_RESERVATION_TTL_SECONDS=str(TTL_SECONDS),
        # Per-worker overload shedding must refuse none of a round's requests: only the limits may.
        MAX_PENDING_PER_WORKER="1000",
        MAX_IN_FLIGHT_PER_WORKER="2000",
        # No health probes: one answered late while the proxy holds answers would find the endpoint down.
        HEALTH_PROBE_SECONDS="0",
    ) as url:
        yield Gateway(url, proxy, model_server)


def _user(name: str, **limits: int) -> dict[str, str]:
    """A user of its own with these limits, and the Authorization header of a key of theirs."""
    user = User.objects.create(identity_id=f"id-{name}", username=name, name=name)
    _, key = api_key_create(owner=user, name="test")
    Limit.objects.create(user=user, **limits)
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def endpoint(gateway: Gateway, model_server: str, transactional_db: None) -> Endpoint:
    """demo-model, served through the proxy; waiting for it as long as a round may stall it."""
    seeded = seed(model_server, wait_seconds=GUARD_SECONDS)
    seeded.endpoint.backend_config["base_url"] = f"http://127.0.0.1:{gateway.proxy.port}/v1"
    seeded.endpoint.save()
    return seeded.endpoint


class _Recording(Connection):
    """The load generator's lean connection (a round's client must not starve the workers of CPU: httpx took
    about as much as both of them), keeping what the test reads of its one answer."""

    def __init__(self) -> None:
        super().__init__()
        self.request_id = ""
        self.body = bytearray()

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-gateway-request-id":
            self.request_id = value.decode()

    def on_body(self, body: bytes) -> None:
        self.body += body


@dataclass(frozen=True)
class Answer:
    status: int
    request_id: str
    body: bytes
    port: int  # the client's: which worker answered


@dataclass
class Round:
    answers: list[Answer]
    workers: set[int]  # the workers that answered them

    def statuses(self) -> dict[int, int]:
        return dict(Counter(answer.status for answer in self.answers))

    def refusal_codes(self) -> set[str]:
        return {orjson.loads(answer.body)["error"]["code"] for answer in self.answers if answer.status == 429}


async def _ask(host: str, port: int, raw: bytes) -> Answer:
    """One request on a connection of its own."""
    _, connection = await asyncio.get_running_loop().create_connection(_Recording, host, port)
    try:
        assert connection.transport is not None
        client_port = connection.transport.get_extra_info("sockname")[1]
        exchange = await connection.send(raw, Exchange(stream=False))
        return Answer(exchange.status, connection.request_id, bytes(connection.body), client_port)
    finally:
        connection.close()


async def _stalled_round(gateway: Gateway, auth: dict[str, str], body: bytes, admitted: int) -> Round:
    """CONCURRENT requests at once, the model server's answers held back until all but `admitted` are answered
    (refused: nothing else can answer meanwhile) and `admitted` have reached the model server, then let through."""
    workers = gateway.workers
    holders: dict[int, int] = {}  # client port -> the worker holding its connection, while it was open
    address = urlsplit(gateway.url)
    host, port = address.hostname or "127.0.0.1", address.port or 80
    raw = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Authorization: {auth['Authorization']}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    arrived_before = _chats_arrived(gateway.model_server)
    gateway.proxy.stall(replies_only=True)
    try:
        sent = [asyncio.create_task(_ask(host, port, raw)) for _ in range(CONCURRENT)]
        answered = 0
        try:
            for answer in asyncio.as_completed(sent, timeout=GUARD_SECONDS):
                await answer
                answered += 1
                if answered % 50 == 1:  # a connection idle for the server's keep-alive timeout is closed
                    holders |= workers_by_client_port(workers)
                if answered == CONCURRENT - admitted:
                    break
            # Every request is decided once the admitted ones have reached the model server too.
            deadline = time.monotonic() + GUARD_SECONDS
            while _chats_arrived(gateway.model_server) - arrived_before < admitted:
                if time.monotonic() > deadline:
                    break  # fewer were admitted than should be: the counts will say so
                await asyncio.sleep(0.02)
        except TimeoutError:
            pass  # more were admitted than should be: let them through, and the counts will say so
    finally:
        gateway.proxy.resume()
    holders |= workers_by_client_port(workers)
    answers = await asyncio.gather(*sent)
    return Round(answers, {holders[answer.port] for answer in answers if answer.port in holders})


def test_200_concurrent_requests_against_a_concurrency_limit_admit_exactly_that_many(
    gateway: Gateway, endpoint: Endpoint
) -> None:
    deciders: set[int] = set()
    for round_ in range(ROUNDS):
        limit = 7
        auth = _user(f"concurrent-{round_}@anl.gov", concurrent=limit)
        done = asyncio.run(_stalled_round(gateway, auth, CHAT, limit))
        assert done.statuses() == {200: limit, 429: CONCURRENT - limit}, f"round {round_}"
        assert done.refusal_codes() == {"rate_limit_exceeded"}
        deciders |= done.workers
    assert len(deciders) == 2, "both workers decided requests against the same limit"


def test_200_concurrent_requests_against_a_budget_admit_what_fits_and_each_leaves_one_usage_row(
    gateway: Gateway, endpoint: Endpoint
) -> None:
    deciders: set[int] = set()
    for round_ in range(ROUNDS):
        fits = 3 + round_ % 5  # 3 to 7 reservations, with room to spare short of one more
        budget = fits * RESERVED + RESERVED - 1
        username = f"budget-{round_}@anl.gov"
        auth = _user(username, tokens_per_day=budget)
        done = asyncio.run(_stalled_round(gateway, auth, CHAT, fits))
        assert done.statuses() == {200: fits, 429: CONCURRENT - fits}, f"round {round_}: budget {budget}"
        assert done.refusal_codes() == {"insufficient_quota"}
        deciders |= done.workers
        ids = sorted(answer.request_id for answer in done.answers)
        rows = _usage_rows(username, expected=CONCURRENT)
        assert sorted(request_id for request_id, _status in rows) == ids, f"round {round_}: one row per request"
        assert Counter(status for _request_id, status in rows) == {200: fits, 429: CONCURRENT - fits}
    assert len(deciders) == 2, "both workers decided requests against the same budget"


def _usage_rows(username: str, *, expected: int) -> list[tuple[str, int]]:
    """The user's usage rows (request id, status), once the gateway's writers have written `expected` of them."""
    deadline = time.monotonic() + GUARD_SECONDS
    rows = RequestLog.objects.filter(user__username=username).values_list("request_id", "status_code")
    while rows.count() < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return list(rows)


def test_a_budget_settles_to_what_each_request_used(gateway: Gateway, endpoint: Endpoint) -> None:
    # Room for one reservation, not two: the second request fits only once the first has given back what it
    # reserved and did not use.
    budget = 2 * RESERVED - 1
    users = [_user(f"settle-{round_}@anl.gov", tokens_per_day=budget) for round_ in range(ROUNDS)]

    async def three_in_a_row(auth: dict[str, str]) -> list[httpx.Response]:
        # A client of its own: the requests go on new connections, to either worker.
        answers = []
        for _ in range(3):
            async with httpx.AsyncClient(base_url=gateway.url, timeout=GUARD_SECONDS) as client:
                answers.append(await client.post(CHAT_PATH, content=CHAT, headers=auth))
        return answers

    async def every_user() -> list[list[httpx.Response]]:
        return await asyncio.gather(*(three_in_a_row(auth) for auth in users))

    for round_, (first, second, third) in enumerate(asyncio.run(every_user())):
        assert (first.status_code, second.status_code) == (200, 200), (round_, first.text, second.text)
        used = [answer.json()["usage"]["total_tokens"] for answer in (first, second)]
        assert used[0] + RESERVED <= budget < 2 * RESERVED, "the second fits only after the first settled"
        if sum(used) + RESERVED <= budget:
            assert third.status_code == 200, (round_, third.text)
        else:
            assert third.status_code == 429, (round_, third.text)
            assert third.json()["error"]["code"] == "insufficient_quota"
            assert f"remaining {budget - sum(used)}," in third.json()["error"]["message"], "what the two used"


def test_a_worker_killed_mid_request_gives_its_slot_back_when_its_lease_expires(
    gateway: Gateway, endpoint: Endpoint, model_server: str
) -> None:
    """Twenty users at once, each holding the one slot of their concurrency limit with a request that hangs at
    the model server, all on one worker, which is then killed. The other worker refuses each user at once (the
    dead worker's leases still hold the slots), then admits them again once the leases have expired."""
    workers = gateway.workers
    assert len(workers) == 2
    users = [_user(f"killed-{round_}@anl.gov", concurrent=1) for round_ in range(ROUNDS)]
    hanging = _body(fake_vllm={"hang": True})
    arrived_before = _chats_arrived(model_server)

    async def scenario() -> tuple[list[httpx.Response], list[float]]:
        victim = min(workers)
        # A keep-alive connection per user, accepted by the victim, and on it at once (before the server's
        # keep-alive timeout could close it) the request that hangs.
        clients: list[httpx.AsyncClient] = []
        held = []
        for auth in users:
            clients.append(await _client_on(gateway.url, victim, workers))
            held.append(asyncio.create_task(clients[-1].post(CHAT_PATH, content=hanging, headers=auth)))
        try:
            deadline = time.monotonic() + GUARD_SECONDS
            while _chats_arrived(model_server) - arrived_before < len(users):  # every slot is taken
                assert time.monotonic() < deadline, "the hanging requests did not all reach the model server"
                await asyncio.sleep(0.05)
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            for outcome in await asyncio.gather(*held, return_exceptions=True):
                assert isinstance(outcome, httpx.TransportError), f"held on the killed worker: {outcome!r}"
            async with httpx.AsyncClient(base_url=gateway.url, timeout=GUARD_SECONDS) as fresh:
                refused = await asyncio.gather(*(fresh.post(CHAT_PATH, content=CHAT, headers=auth) for auth in users))
                back = await asyncio.gather(*(_admitted_again(fresh, auth, killed_at) for auth in users))
        finally:
            for client in clients:
                await client.aclose()
        return refused, back

    refused, back = asyncio.run(scenario())
    assert [answer.status_code for answer in refused] == [429] * len(users), [answer.text for answer in refused]
    for answer in refused:
        error = answer.json()["error"]
        assert error["code"] == "rate_limit_exceeded"
        assert error["message"].startswith("Rate limit reached for concurrent requests for user killed-")
    assert len(back) == len(users)  # each user's slot came back (how soon: the seconds, not asserted)
    # The worker that replaced the killed one records its requests as lost (its journal, adopted at start-up).
    # Waited for here: those writes must not meet the next test's emptying of the database.
    lost = RequestLog.objects.filter(user__username__startswith="killed-", error_code=LOST_ERROR_CODE)
    deadline = time.monotonic() + GUARD_SECONDS
    while lost.count() < len(users):
        assert time.monotonic() < deadline, "the killed worker's requests were not recorded as lost"
        time.sleep(0.05)


async def _client_on(url: str, worker: int, workers: set[int]) -> httpx.AsyncClient:
    """A client with one keep-alive connection, accepted by `worker` (new connections until one is)."""
    for _attempt in range(1000):
        client = httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=1), timeout=GUARD_SECONDS)
        probe = await client.get("/resource_server/health")
        assert probe.status_code == 200
        if worker_answering(probe, workers) == worker:
            return client
        await client.aclose()
    raise AssertionError(f"worker {worker} accepted none of 1000 connections")


async def _admitted_again(client: httpx.AsyncClient, auth: dict[str, str], since: float) -> float:
    """Seconds from `since` until a request of this user's is admitted again."""
    deadline = time.monotonic() + GUARD_SECONDS
    while True:
        answer = await client.post(CHAT_PATH, content=CHAT, headers=auth)
        if answer.status_code == 200:
            return time.monotonic() - since
        assert answer.status_code == 429, answer.text
        assert time.monotonic() < deadline, "the killed worker's slot never came back"
        await asyncio.sleep(0.1)


def _chats_arrived(model_server: str) -> int:
    requests = fake_stats(model_server)["requests"]
    assert isinstance(requests, dict)
    return int(requests.get("/v1/chat/completions", 0))
