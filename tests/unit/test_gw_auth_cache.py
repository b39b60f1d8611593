"""The Gateway's verified-token cache (qmtl/gateway/auth.py): a token is verified once and
trusted until its expiry, no longer."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from qmtl.common.config import AuthConfig
from qmtl.common.errors import Unauthorized
from qmtl.gateway.auth import Authenticator, Identity, _VerifiedTokens


@pytest.fixture
def keys(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "pub.pem"
    pem.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key, str(pem)


def token(key, ttl=60, **claims):
    now = int(time.time())
    return jwt.encode({"sub": "alice", "iss": "i", "aud": "a", "iat": now, "exp": now + ttl, **claims}, key, algorithm="ES256")


async def test_a_token_is_verified_once_then_served_from_the_cache(keys, monkeypatch):
    key, pem = keys
    auth = Authenticator(AuthConfig(mode="jwt", public_keys=[pem], issuer="i", audience="a"))
    calls = 0
    real = auth.verify

    async def counting(tok):
        nonlocal calls
        calls += 1
        return await real(tok)

    monkeypatch.setattr(auth, "verify", counting)
    t = token(key, world_roles={"w": ["reader"]})
    a = await auth.authenticate({"authorization": f"Bearer {t}"})
    b = await auth.authenticate({"authorization": f"Bearer {t}"})
    assert a is b and a.subject == "alice" and a.has_role("w", "reader") and calls == 1
    with pytest.raises(Unauthorized):  # a different (forged) token is verified, not looked up
        await auth.authenticate({"authorization": f"Bearer {t[:-4]}AAAA"})
    assert calls == 2


def test_cache_entries_end_at_the_token_expiry_and_are_bounded():
    clock = [1000.0]
    cache = _VerifiedTokens(max_entries=2, max_age=300, clock=lambda: clock[0])
    cache.put("t1", Identity("a", {"exp": 1010}))
    cache.put("no-exp", Identity("b", {}))  # never cached without exp
    cache.put("expired", Identity("c", {"exp": 999}))
    assert cache.get("t1").subject == "a" and cache.get("no-exp") is None and cache.get("expired") is None
    clock[0] = 1010
    assert cache.get("t1") is None
    cache.put("long", Identity("d", {"exp": 10_000}))
    clock[0] = 1010 + 300
    assert cache.get("long") is None  # max_age: a withdrawn key stops verifying within it
    for i in range(5):
        cache.put(f"k{i}", Identity("e", {"exp": 10_000}))
    assert len(cache._data) == 2


async def test_exp_nbf_iat_are_checked_against_the_injected_clock_with_5s_leeway(keys):
    from qmtl.common.clock import ManualClock

    key, pem = keys
    short = token(key, ttl=2)
    clock = ManualClock(jwt.decode(short, options={"verify_signature": False})["iat"])  # the token's own "now"
    auth = Authenticator(AuthConfig(mode="jwt", public_keys=[pem], issuer="i", audience="a"), clock=clock.time)
    assert (await auth.verify(short))["sub"] == "alice"
    clock.advance(2 + 4.9)  # inside the leeway
    assert (await auth.verify(short))["sub"] == "alice"
    clock.advance(0.2)
    with pytest.raises(Unauthorized, match="expired"):
        await auth.verify(short)
    early = token(key, ttl=600, nbf=int(clock.time()) + 60)
    with pytest.raises(Unauthorized, match="nbf"):
        await auth.verify(early)
    clock.advance(60)
    assert (await auth.verify(early))["sub"] == "alice"
