"""Descriptor tokens: the generated key survives a restart, claims round-trip, rotation."""

from __future__ import annotations

import os
import stat
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from qmtl.common.keys import InvalidToken, SigningKey
from qmtl.gateway.events.tokens import GENERATED_KEY_FILE, Tokens, normalise_topics


def make(tmp_path, **kw):
    args = {"signing_keys": [], "data_dir": str(tmp_path), "token_ttl": 300, "algorithm": "ES256", "issuer": "http://gw"}
    args.update(kw)
    return Tokens(**args)


def test_generated_key_is_written_private_and_reused(tmp_path):
    a = make(tmp_path)
    token, exp = a.issue(subject="u", topics=["queues"], world_id=None, strategy_id=None,
                         queue_keys=[(("btc", "eth"), 60, "all")])
    path = tmp_path / GENERATED_KEY_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    b = make(tmp_path)  # a restart
    assert b.ring.signer.kid == a.ring.signer.kid
    scope = b.verify(token)
    assert scope.subject == "u" and scope.topics == ("queues",) and scope.world_id is None
    assert scope.queue_keys == ((("btc", "eth"), 60, "all"),)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["aud"] == "controlbus" and claims["iss"] == "http://gw" and exp == claims["exp"]
    assert set(claims) >= {"sub", "world_id", "strategy_id", "topics", "jti", "iat", "exp"}


def test_configured_keys_rotation_and_expiry_of_the_old_key(tmp_path):
    path = tmp_path / "k.pem"

    def write(key):
        path.write_bytes(key.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))

    k1, k2 = SigningKey.generate(), SigningKey.generate()
    write(k1)
    t = make(tmp_path, signing_keys=[str(path)])
    old, _ = t.issue(subject="u", topics=["activation"], world_id="w", strategy_id=None)
    assert t.reload() is False  # unchanged
    write(k2)
    assert t.reload() is True
    new, _ = t.issue(subject="u", topics=["activation"], world_id="w", strategy_id=None)
    assert jwt.get_unverified_header(new)["kid"] == k2.kid
    assert [k["kid"] for k in t.jwks()["keys"]] == [k2.kid, k1.kid]
    assert t.verify(old).world_id == "w" and t.verify(new).world_id == "w"
    t.ring._clock = lambda: time.time() + 301  # past the old key's last token
    with pytest.raises(InvalidToken) as err:
        t.verify(old)
    assert err.value.reason == "unknown kid"
    assert [k["kid"] for k in t.jwks()["keys"]] == [k2.kid]


def test_algorithm_must_match_the_key(tmp_path):
    with pytest.raises(ValueError):
        make(tmp_path, algorithm="RS256")


def test_topics():
    assert normalise_topics(["queue", "activation", "queues"]) == ["queues", "activation"]
    with pytest.raises(ValueError):
        normalise_topics(["orders"])
