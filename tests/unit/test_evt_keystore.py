"""Signing keys shared by every Gateway replica through the Gateway's database
(qmtl/gateway/events/keystore.py): a token issued by one replica verifies on another,
rotation is an insert, an unknown kid re-reads the table at a bounded rate. Two replicas
here are two Tokens objects on one real PostgreSQL schema; tests/topology/ runs them as
separate processes."""

from __future__ import annotations

import contextlib
import time

import jwt
import pytest

from qmtl.common.keys import InvalidToken, SigningKey
from qmtl.gateway.events.keystore import LEEWAY, DatabaseKeyStore, KeyRow, schedule_ring
from qmtl.gateway.events.tokens import Tokens
from qmtl.store import Database

TTL = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def replica(db: Database, clock: Clock, name: str) -> Tokens:
    store = DatabaseKeyStore(db, algorithm="ES256", token_ttl=TTL, owner=name, refresh=3600, clock=clock)
    return Tokens(signing_keys=[], data_dir="/nonexistent", token_ttl=TTL, algorithm="ES256", issuer="http://gw", store=store)


@contextlib.asynccontextmanager
async def started(db: Database, clock: Clock, *names: str):
    replicas = [replica(db, clock, n) for n in names]
    try:
        for t in replicas:
            await t.start()
        yield replicas
    finally:
        for t in replicas:
            await t.stop()


def issue(t: Tokens) -> str:
    return t.issue(subject="u", topics=["activation"], world_id="w1", strategy_id=None)[0]


@pytest.fixture
async def db(pg_schema):
    url, schema = pg_schema
    database = Database(url, schema=schema)
    yield database
    await database.close()


def test_schedule_ring_signs_with_the_newest_active_key_and_keeps_the_previous_one_for_a_token_lifetime():
    now = 1_000_000.0
    a, b, c = (SigningKey.generate("ES256") for _ in range(3))
    rows = [KeyRow(a, now - 500), KeyRow(b, now - 10), KeyRow(c, now + 30)]
    ring, change = schedule_ring(rows, now=now, token_ttl=TTL, clock=lambda: now)
    roles = {d["kid"]: d["role"] for d in ring.describe()}
    # a was replaced 10 s ago: it still verifies; c is published before it signs
    assert ring.signer.kid == b.kid and roles == {a.kid: "verifying", b.kid: "signing", c.kid: "staged"}
    assert change == now + 30  # c starts signing then
    later = now + 31
    ring2, change2 = schedule_ring(rows, now=later, token_ttl=TTL, clock=lambda: later)
    assert ring2.signer.kid == c.kid and change2 == pytest.approx(now - 10 + TTL + LEEWAY)  # a stops verifying then
    much_later = now + 1000
    ring3, change3 = schedule_ring(rows, now=much_later, token_ttl=TTL, clock=lambda: much_later)
    assert [d["kid"] for d in ring3.describe()] == [c.kid] and change3 is None


async def test_a_token_issued_by_one_replica_verifies_on_another(db):
    async with started(db, Clock(), "g1", "g2") as (g1, g2):
        assert g1.ring.signer.kid == g2.ring.signer.kid  # the second found the first's key
        assert g2.verify(issue(g1)).subject == "u" and g1.verify(issue(g2)).subject == "u"
        state = g2.describe()
        assert state["source"] == "database" and state["shared"] is True and state["signer"] == g1.ring.signer.kid
        assert [k["role"] for k in state["keys"]] == ["signing"]
        assert "private" not in str(state).lower()


async def test_rotation_is_an_insert_and_siblings_follow_it(db):
    clock = Clock()
    async with started(db, clock, "g1", "g2") as (g1, g2):
        old_kid = g1.ring.signer.kid
        before = issue(g1)
        new = await g1.store.rotate(stage=10)  # g2 does not re-read yet (refresh is an hour)
        assert g1.ring.signer.kid == old_kid and new.kid in {k["kid"] for k in g1.jwks()["keys"]}  # staged: published first
        clock.now += 11  # the new key signs from now on, on g1
        after = issue(g1)
        assert jwt.get_unverified_header(after)["kid"] == new.kid
        # g2 holds only the old ring: the unknown kid makes it re-read the table, then it verifies
        assert new.kid not in {k["kid"] for k in g2.jwks()["keys"]}
        assert (await g2.verify_fresh(after)).subject == "u"
        assert g2.ring.signer.kid == new.kid and g2.unknown_kid_refusals == 0
        for t in (g1, g2):  # the old key verifies for one token lifetime after it was replaced
            assert (await t.verify_fresh(before)).subject == "u"
        clock.now += TTL + LEEWAY + 1
        for t in (g1, g2):
            with pytest.raises(InvalidToken, match="unknown kid"):
                await t.verify_fresh(before)


async def test_unknown_kids_re_read_the_table_at_a_bounded_rate(db):
    clock = Clock()
    async with started(db, clock, "g") as (g,):
        other = SigningKey.generate("ES256")
        forged = jwt.encode({"aud": "controlbus", "sub": "x", "topics": ["activation"], "exp": int(clock.now) + 60},
                            other.private_key, algorithm="ES256", headers={"kid": "forged-kid"})
        reloads = g.store.reloads
        for _ in range(50):
            with pytest.raises(InvalidToken, match="unknown kid"):
                await g.verify_fresh(forged)
        assert g.store.reloads - reloads == 1  # one re-read for the whole flood
        assert g.unknown_kid_refusals == 50 and g.describe()["unknown_kid_refusals"] == 50


def test_a_generated_key_says_it_is_not_shared(tmp_path):
    t = Tokens(signing_keys=[], data_dir=str(tmp_path), token_ttl=TTL, algorithm="ES256", issuer="http://gw")
    state = t.describe()
    assert state["source"] == "generated" and state["shared"] is False
    assert "other Gateway replicas refuse its tokens" in state["detail"]


def test_qmtl_rotate_signing_key_inserts_a_staged_key(tmp_path, capsys):
    import asyncio

    from qmtl.cli import main

    assert main(["rotate-signing-key", "--data-dir", str(tmp_path), "--stage", "60"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("new signing key ") and "the previous one verifies for 300 s more" in out

    async def ring():
        db = Database(f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}")
        try:
            store = DatabaseKeyStore(db, algorithm="ES256", token_ttl=300, owner="t")
            await store.load()
            return store.current().describe()
        finally:
            await db.close()

    roles = sorted(k["role"] for k in asyncio.run(ring()))
    assert roles == ["signing", "staged"]  # the first key signs; the new one is published, signs in 60 s
    assert main(["rotate-signing-key", "--data-dir", str(tmp_path / "x")]) == 0  # an empty ring: first key + staged one
