"""The SDK against a Gateway that verifies its callers' JWTs: ``qmtl up`` with
``gateway.auth.mode: jwt`` (issuer and audience required) and WorldService on
``rbac: enforce`` (it trusts only the identity the Gateway forwards with the service token).

Keys: an ES256 pair generated for the module with ``cryptography``
(:class:`tests.helpers.wsproc.JwtIssuer`); the Gateway reads the public half from a PEM file
(``auth.public_keys``). A PEM rather than a JWKS served by the test: the Gateway is a
subprocess that outlives each test's event loop, so a JWKS would need a server of its own
in a thread for the whole module, and how the Gateway obtains keys (kid lookup, JWKS
fetch, fetch failures → 503) is already covered by
``tests/integration/test_gateway_worlds_auth.py::test_keys_from_a_jwks_url``. What the SDK
sees — a verified caller, or a 401 problem — is the same either way.

Covered: a static token (worlds calls, a strategy submission, and the event stream's
snapshot and a published change), a token callable (sync and async) called for every
request so a refreshed token is what the Gateway sees — the stream's descriptor refreshes
included, refused tokens (none, expired, wrong audience, wrong issuer, unknown key) as
:class:`Unauthorized` carrying the problem's detail, and the verified subject and roles
reaching WorldService (owner, RBAC, audit actor).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import jwt
import pytest

from qmtl.sdk import Dag, EventStream, Forbidden, GatewayClient, Node, Unauthorized
from tests.helpers.wsproc import JwtIssuer
from tests.sdk.conftest import LiveGateway, embedded_env
from tests.sdk.live import QmtlUp, wait_until
from tests.sdk.test_stream_live import Collector

OWNER_ALL = {"*": ["owner"]}
ISSUER = "https://idp.sdk.test"
AUDIENCE = "qmtl-sdk-tests"


@pytest.fixture(scope="module")
def idp(tmp_path_factory) -> JwtIssuer:
    return JwtIssuer(tmp_path_factory.mktemp("idp"), issuer=ISSUER, audience=AUDIENCE)


@pytest.fixture(scope="module")
def gw(tmp_path_factory, idp) -> Iterator[QmtlUp]:
    """``qmtl up`` in JWT mode; event tokens live 3 s, so streams refresh them."""
    up = QmtlUp(tmp_path_factory.mktemp("sdk-jwt") / "data", env=embedded_env(
        QMTL__GATEWAY__AUTH__MODE="jwt",
        QMTL__GATEWAY__AUTH__PUBLIC_KEYS=json.dumps([str(idp.pem_path)]),  # a YAML (flow) list
        QMTL__GATEWAY__AUTH__ISSUER=ISSUER,
        QMTL__GATEWAY__AUTH__AUDIENCE=AUDIENCE,
        QMTL__WORLDSERVICE__RBAC="enforce",
        QMTL__GATEWAY__EVENTS__TOKEN_TTL="3",
    ))
    try:
        up.start()
        yield up
    finally:
        up.stop()


world_id = LiveGateway.world_id


class Tokens:
    """A token source that mints a fresh token on every call; each carries its own subject
    (``<prefix>-<n>``), so what the Gateway saw tells which call's token it was."""

    def __init__(self, idp: JwtIssuer, prefix: str) -> None:
        self.idp = idp
        self.prefix = prefix
        self.calls = 0
        self.ttl = 600

    def mint(self) -> str:
        self.calls += 1
        return self.idp.token(f"{self.prefix}-{self.calls}", world_roles=OWNER_ALL, ttl=self.ttl)

    def sync(self) -> str:
        return self.mint()

    async def async_(self) -> str:
        return self.mint()


def subject_of(token: str) -> str:
    return jwt.decode(token, options={"verify_signature": False})["sub"]


async def audit_by_event(client: GatewayClient, world_id: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    async for rec in client.iter_audit(world_id):
        out.setdefault(rec["event"], []).append(rec)
    return out


async def test_a_static_token_authenticates_calls_and_the_event_stream(gw, idp):
    token = idp.token("sdk-alice", world_roles=OWNER_ALL)
    async with GatewayClient(gw.url, token=token, validate_responses=True, backoff_base=0.05) as client:
        w = world_id("jwt")
        assert (await client.create_world(w, "JWT world"))["owner"] == "sdk-alice"  # the verified subject
        decision = await client.decide(w)
        assert decision["world_id"] == w and decision["effective_mode"] == "backtest"
        act = await client.get_activation(w, "s-jwt", "long")
        assert act["active"] is False and act["weight"] == 0

        ack = await client.submit_strategy(Dag([Node("Compute", code=f"jwt {w}")]), run_type="backtest", world_id=w)
        assert (await client.wait_for_status(ack["strategy_id"], timeout=20))["status"] == "completed"

        got = Collector()
        async with EventStream(client, world_id=w, topics=["activation"], on_event=got) as stream:
            await stream.wait_synced(10)
            assert subject_of(stream.descriptor["token"]) == "sdk-alice"  # the descriptor is issued to the caller
            snaps = got.of("snapshot")
            assert len(snaps) == 1 and snaps[0].data["topic"] == "activation" and snaps[0].data["items"] == []
            await client.apply(w, {"activate": [{"strategy_id": "s-jwt", "side": "long", "weight": 0.5}]},
                               consent_live=True)
            await wait_until(lambda: any(e.data.get("side") == "long" for e in got.of("activation_updated", "stream")),
                             10, what="the published change on the stream")
            change = next(e for e in got.of("activation_updated", "stream") if e.data["side"] == "long")
            assert (change.data["strategy_id"], change.data["active"], change.data["weight"]) == ("s-jwt", True, 0.5)
            assert got.events.index(snaps[0]) < got.events.index(change)  # snapshot first, then the change
            assert stream.stats.hash_mismatches == 0
        assert (await client.get_activation(w, "s-jwt", "long"))["active"] is True


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_token_callable_is_called_for_every_request(gw, idp, kind):
    tokens = Tokens(idp, f"rot-{kind}")
    source = tokens.sync if kind == "sync" else tokens.async_
    async with GatewayClient(gw.url, token=source, backoff_base=0.05) as client:
        w = world_id("rot")
        assert (await client.create_world(w, "rotating"))["owner"] == f"rot-{kind}-1"
        await client.decide(w)
        await client.get_world(w)
        assert tokens.calls == 3  # once per request

        # the token expires: the next call is refused; the one after it gets a fresh token and passes
        tokens.ttl = -60
        with pytest.raises(Unauthorized) as expired:
            await client.get_world(w)
        assert expired.value.status == 401 and "expired" in expired.value.detail.lower()
        tokens.ttl = 600
        before = tokens.calls
        await client.update_world(w, description="after a refresh")
        assert tokens.calls == before + 1
        records = await audit_by_event(client, w)
        assert [r["actor"] for r in records["world.created"]] == [f"rot-{kind}-1"]
        assert [r["actor"] for r in records["world.updated"]] == [f"rot-{kind}-{before + 1}"]  # the refreshed token's

        # the stream's descriptor refreshes (token TTL 3 s) are requests too: each gets a fresh caller token
        async with EventStream(client, world_id=w, topics=["activation"]) as stream:
            await stream.wait_synced(10)
            first = int(subject_of(stream.descriptor["token"]).rsplit("-", 1)[1])
            await wait_until(lambda: stream.stats.token_refreshes >= 1, 10, what="a descriptor refresh")
            refreshed = int(subject_of(stream.descriptor["token"]).rsplit("-", 1)[1])
            assert first < refreshed <= tokens.calls
            assert stream.status != "failed"


async def test_refused_tokens_raise_unauthorized_with_the_problem_detail(gw, idp, tmp_path):
    owner = idp.token("sdk-owner", world_roles=OWNER_ALL)
    w = world_id("deny")
    async with GatewayClient(gw.url, token=owner) as good:
        await good.create_world(w, "refusals")
        await good.decide(w)  # cached at the Gateway: a refused caller must not get the cached answer either
        await good.decide(w)

    stranger = JwtIssuer(tmp_path, issuer=ISSUER, audience=AUDIENCE)  # same issuer, audience and kid: another key
    cases = {
        "no token": (None, "a bearer token is required"),
        "expired": (idp.token("sdk-owner", world_roles=OWNER_ALL, ttl=-60), "expired"),
        "wrong audience": (idp.token("sdk-owner", world_roles=OWNER_ALL, aud="someone-else"), "audience"),
        "wrong issuer": (idp.token("sdk-owner", world_roles=OWNER_ALL, iss="https://evil.test"), "issuer"),
        "unknown key": (stranger.token("sdk-owner", world_roles=OWNER_ALL), "signature"),
    }
    for label, (token, says) in cases.items():
        async with GatewayClient(gw.url, token=token, backoff_base=0.05) as client:
            calls = {
                "decide": lambda cid: client.decide(w, correlation_id=cid),
                "create_world": lambda cid: client.create_world(world_id("never"), "x", correlation_id=cid),
                "submit_strategy": lambda cid: client.submit_strategy(Dag([Node("Compute", code=f"refused {w}")]),
                                                                      run_type="backtest", correlation_id=cid),
                "subscribe": lambda cid: client.subscribe(["activation"], world_id=w, correlation_id=cid),
            }
            for name, call in calls.items():
                cid = f"jwt-{label.replace(' ', '-')}-{name}"
                with pytest.raises(Unauthorized) as refused:
                    await call(cid)
                err = refused.value
                assert err.status == 401 and err.title == "Unauthorized", (label, name, err)
                assert err.detail and says in err.detail.lower(), (label, name, err.detail)
                assert err.body["status"] == 401 and err.body["detail"] == err.detail
                assert err.headers["www-authenticate"].startswith("Bearer"), (label, name)
                assert err.correlation_id == cid, (label, name)
            assert client.stats.by_status == {401: len(calls)} and client.stats.retries == 0  # a 401 is never retried

            stream = EventStream(client, world_id=w, topics=["activation"])
            with pytest.raises(Unauthorized) as no_stream:
                await stream.start()
            assert no_stream.value.status == 401 and says in no_stream.value.detail.lower()
            await stream.stop()

    async with GatewayClient(gw.url, token=owner) as good:  # nothing refused reached WorldService
        assert {r["actor"] async for r in good.iter_audit(w)} == {"sdk-owner"}


async def test_the_verified_subject_and_roles_reach_worldservice(gw, idp):
    w = world_id("who")
    async with (
        GatewayClient(gw.url, token=idp.token("sdk-alice", world_roles=OWNER_ALL)) as alice,
        GatewayClient(gw.url, token=idp.token("sdk-bob", world_roles={w: ["reader"]})) as bob,
        GatewayClient(gw.url, token=idp.token("sdk-carol", world_roles={w: ["operator"]})) as carol,
    ):
        assert (await alice.create_world(w, "who did it", correlation_id="sdk-jwt-create"))["owner"] == "sdk-alice"
        assert (await bob.get_world(w))["world_id"] == w  # a reader may read ...
        with pytest.raises(Forbidden) as denied:  # ... but not apply: WorldService decides on the forwarded roles
            await bob.apply(w, {"activate": ["s-who"]}, consent_live=True)
        assert denied.value.status == 403 and denied.value.get("required_role") == "operator"
        assert "sdk-bob" in denied.value.detail
        applied = await carol.apply(w, {"activate": ["s-who"]}, consent_live=True, correlation_id="sdk-jwt-apply")
        assert applied["ok"]

        records = await audit_by_event(alice, w)
        created, = records["world.created"]
        assert (created["actor"], created["correlation_id"]) == ("sdk-alice", "sdk-jwt-create")
        succeeded, = records["apply.succeeded"]
        assert (succeeded["actor"], succeeded["correlation_id"]) == ("sdk-carol", "sdk-jwt-apply")
        assert all(r["actor"] != "sdk-bob" for recs in records.values() for r in recs)  # refused: nothing recorded
