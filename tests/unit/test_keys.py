import base64
import hashlib
import hmac
import json

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from qmtl.common.keys import InvalidToken, KeyRing, SigningKey

AUD = "controlbus"


class FakeClock:
    def __init__(self, now=1_700_000_000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict, payload: dict, signature: bytes = b"") -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(signature)}"


@pytest.fixture(scope="module")
def es_key():
    return SigningKey.generate()


@pytest.fixture(scope="module")
def rs_key():
    return SigningKey.generate("RS256")


@pytest.fixture
def clock():
    return FakeClock()


def claims():
    return {"aud": AUD, "sub": "alice", "world_id": "w1", "topics": ["activation"]}


# -- SigningKey -----------------------------------------------------------------------


def test_generate_defaults(es_key, rs_key):
    assert es_key.algorithm == "ES256" and rs_key.algorithm == "RS256"
    assert es_key.kid != rs_key.kid
    assert SigningKey.generate(kid="k1").kid == "k1"


def test_kid_is_rfc7638_thumbprint(es_key, rs_key):
    for key in (es_key, rs_key):
        jwk = key.public_jwk()
        required = ("crv", "kty", "x", "y") if jwk["kty"] == "EC" else ("e", "kty", "n")
        canonical = "{" + ",".join(f'"{m}":"{jwk[m]}"' for m in required) + "}"
        assert key.kid == b64(hashlib.sha256(canonical.encode()).digest())


def test_rfc7638_example_thumbprint():
    # RFC 7638 §3.1: the example RSA key's thumbprint.
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV"
        "4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7"
        "d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF4"
        "4-csFCur-kEgU8awapJzKnqDKgw"
    )
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    from cryptography.hazmat.primitives.asymmetric import rsa

    n_int = int.from_bytes(base64.urlsafe_b64decode(pad(n)), "big")
    public = rsa.RSAPublicNumbers(65537, n_int)
    key = SigningKey.generate("RS256")
    key.public_key = public.public_key()  # thumbprint only needs the public half
    assert key.thumbprint() == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_public_jwk_members(es_key):
    jwk = es_key.public_jwk()
    assert set(jwk) == {"kty", "crv", "x", "y", "kid", "alg", "use"}
    assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"], jwk["kid"]) == ("EC", "P-256", "ES256", "sig", es_key.kid)
    assert "d" not in jwk


def test_from_pem_path_and_bytes(tmp_path, es_key, rs_key):
    for key in (es_key, rs_key):
        pem = key.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path = tmp_path / f"{key.algorithm}.pem"
        path.write_bytes(pem)
        loaded = SigningKey.from_pem(str(path))
        assert (loaded.algorithm, loaded.kid) == (key.algorithm, key.kid)
        assert SigningKey.from_pem(pem, kid="custom").kid == "custom"


def test_unsupported_keys_are_refused():
    with pytest.raises(ValueError):
        SigningKey.generate("HS256")
    with pytest.raises(ValueError):
        SigningKey(ec.generate_private_key(ec.SECP384R1()))


# -- KeyRing: sign / verify -------------------------------------------------------------


def test_round_trip_adds_standard_claims(es_key, clock):
    ring = KeyRing([es_key], clock=clock)
    token = ring.sign(claims())
    assert jwt.get_unverified_header(token)["kid"] == es_key.kid
    got = ring.verify(token, audience=AUD)
    assert got["sub"] == "alice" and got["topics"] == ["activation"]
    assert got["iat"] == int(clock.now) and got["exp"] == int(clock.now + 300)
    assert len(got["jti"]) == 32
    assert ring.verify(ring.sign(claims()), audience=AUD)["jti"] != got["jti"]


def test_given_claims_are_kept(rs_key, clock):
    ring = KeyRing([rs_key], clock=clock)
    token = ring.sign({**claims(), "jti": "j1", "exp": int(clock.now) + 10}, ttl=999)
    got = ring.verify(token, audience=AUD)
    assert (got["jti"], got["exp"]) == ("j1", int(clock.now) + 10)


def test_jwks_verifies_with_plain_pyjwt(es_key, rs_key, clock):
    ring = KeyRing([rs_key, es_key], clock=clock)
    jwk_set = jwt.PyJWKSet.from_dict(ring.jwks())
    assert {k.key_id for k in jwk_set.keys} == {es_key.kid, rs_key.kid}
    token = ring.sign(claims())
    header = jwt.get_unverified_header(token)
    public = jwk_set[header["kid"]]
    decoded = jwt.decode(token, public.key, algorithms=[public.algorithm_name], audience=AUD, options={"verify_iat": False, "verify_exp": False})
    assert decoded["sub"] == "alice"


def test_expired(es_key, clock):
    ring = KeyRing([es_key], token_ttl=60, clock=clock)
    token = ring.sign(claims())
    clock.advance(59)
    ring.verify(token, audience=AUD)
    clock.advance(1)
    with pytest.raises(InvalidToken, match="expired"):
        ring.verify(token, audience=AUD)
    assert ring.verify(token, audience=AUD, leeway=5)["sub"] == "alice"


def test_not_yet_valid(es_key, clock):
    ring = KeyRing([es_key], clock=clock)
    token = ring.sign({**claims(), "iat": int(clock.now) + 100})
    with pytest.raises(InvalidToken, match="not yet valid"):
        ring.verify(token, audience=AUD)


def test_wrong_or_missing_audience(es_key, clock):
    ring = KeyRing([es_key], clock=clock)
    with pytest.raises(InvalidToken, match="bad audience"):
        ring.verify(ring.sign(claims()), audience="other")
    no_aud = {k: v for k, v in claims().items() if k != "aud"}
    with pytest.raises(InvalidToken, match="bad audience"):
        ring.verify(ring.sign(no_aud), audience=AUD)


def test_tampered_payload_and_signature(es_key, clock):
    ring = KeyRing([es_key], clock=clock)
    header, payload, sig = ring.sign(claims()).split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body["sub"] = "mallory"
    with pytest.raises(InvalidToken, match="bad signature"):
        ring.verify(f"{header}.{b64(json.dumps(body).encode())}.{sig}", audience=AUD)
    other = KeyRing([SigningKey.generate(kid=es_key.kid)], clock=clock).sign(claims())
    with pytest.raises(InvalidToken, match="bad signature"):
        ring.verify(other, audience=AUD)  # same kid, different key


def test_unknown_kid(es_key, clock):
    ring = KeyRing([es_key], clock=clock)
    stranger = KeyRing([SigningKey.generate()], clock=clock)
    with pytest.raises(InvalidToken, match="unknown kid"):
        ring.verify(stranger.sign(claims()), audience=AUD)


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "x.y", 123])
def test_malformed(es_key, clock, token):
    with pytest.raises(InvalidToken, match="malformed"):
        KeyRing([es_key], clock=clock).verify(token, audience=AUD)


def test_missing_exp_is_malformed(es_key, clock):
    token = jwt.encode({"aud": AUD}, es_key.private_key, algorithm="ES256", headers={"kid": es_key.kid})
    with pytest.raises(InvalidToken, match="malformed"):
        KeyRing([es_key], clock=clock).verify(token, audience=AUD)


def test_hs256_forged_with_public_key_is_refused(rs_key, es_key, clock):
    for key in (rs_key, es_key):
        ring = KeyRing([key], clock=clock)
        public_pem = key.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
        payload = {**claims(), "exp": int(clock.now) + 60}
        signing_input = forge(header, payload).rsplit(".", 1)[0]
        sig = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
        forged = f"{signing_input}.{b64(sig)}"
        # the forgery is a genuine HMAC over the public key, so only the algorithm check stops it
        assert jwt.algorithms.HMACAlgorithm(hashlib.sha256).verify(signing_input.encode(), public_pem, sig)
        with pytest.raises(InvalidToken, match="algorithm not allowed"):
            ring.verify(forged, audience=AUD)


def test_alg_none_is_refused(es_key, clock):
    ring = KeyRing([es_key], clock=clock)
    for alg in ("none", "None", "NONE"):
        token = forge({"alg": alg, "typ": "JWT", "kid": es_key.kid}, {**claims(), "exp": int(clock.now) + 60})
        with pytest.raises(InvalidToken, match="algorithm not allowed"):
            ring.verify(token, audience=AUD)


def test_key_algorithm_mismatch_is_refused(es_key, rs_key, clock):
    # Both algorithms are in the ring, but an RS256 header naming the ES256 key is refused.
    ring = KeyRing([es_key, rs_key], clock=clock)
    header = {"alg": "RS256", "typ": "JWT", "kid": es_key.kid}
    token = forge(header, {**claims(), "exp": int(clock.now) + 60}, b"sig")
    with pytest.raises(InvalidToken, match="algorithm not allowed"):
        ring.verify(token, audience=AUD)


# -- rotation --------------------------------------------------------------------------


def test_rotation_keeps_old_key_until_its_tokens_expire(clock):
    old, new = SigningKey.generate(), SigningKey.generate()
    ring = KeyRing([old], token_ttl=300, clock=clock)
    old_token = ring.sign(claims())
    clock.advance(100)
    ring.rotate(new)
    new_token = ring.sign(claims())
    assert jwt.get_unverified_header(new_token)["kid"] == new.kid
    assert ring.signer is new
    assert [k["kid"] for k in ring.jwks()["keys"]] == [new.kid, old.kid]
    assert ring.verify(old_token, audience=AUD)["sub"] == "alice"

    clock.advance(200)  # old_token's exp
    with pytest.raises(InvalidToken, match="expired"):
        ring.verify(old_token, audience=AUD)
    assert old.kid in [k["kid"] for k in ring.jwks()["keys"]]  # retired_at + ttl not reached yet

    clock.advance(100)  # retired_at + token_ttl
    assert [k["kid"] for k in ring.jwks()["keys"]] == [new.kid]
    with pytest.raises(InvalidToken, match="unknown kid"):
        ring.verify(old_token, audience=AUD, leeway=10_000)
    assert ring.verify(new_token, audience=AUD, leeway=1)["sub"] == "alice"


def test_retired_key_outlives_a_long_token(clock):
    old, new = SigningKey.generate(), SigningKey.generate()
    ring = KeyRing([old], token_ttl=60, clock=clock)
    long_token = ring.sign(claims(), ttl=600)
    ring.rotate(new)
    clock.advance(599)
    assert ring.verify(long_token, audience=AUD)["sub"] == "alice"
    clock.advance(1)
    assert [k["kid"] for k in ring.jwks()["keys"]] == [new.kid]


def test_stage_publishes_before_signing(clock):
    current, nxt = SigningKey.generate(), SigningKey.generate()
    ring = KeyRing([current], clock=clock)
    ring.stage(nxt)
    assert {k["kid"] for k in ring.jwks()["keys"]} == {current.kid, nxt.kid}
    assert jwt.get_unverified_header(ring.sign(claims()))["kid"] == current.kid
    clock.advance(10_000)  # a staged key never expires
    assert nxt.kid in {k["kid"] for k in ring.jwks()["keys"]}
    ring.rotate(nxt)
    assert ring.signer is nxt


def test_rotate_refuses_duplicate_kid(es_key, clock):
    ring = KeyRing([es_key], clock=clock)
    with pytest.raises(ValueError):
        ring.rotate(es_key)


def test_newest_key_signs_and_others_retire(clock):
    older = SigningKey.generate(created_at=1.0)
    newer = SigningKey.generate(created_at=2.0)
    ring = KeyRing([newer, older], token_ttl=30, clock=clock)
    assert ring.signer is newer
    clock.advance(30)
    assert [k["kid"] for k in ring.jwks()["keys"]] == [newer.kid]


def test_from_config(tmp_path, clock):
    ring = KeyRing.from_config(None, clock=clock)
    assert ring.signer.algorithm == "ES256" and len(ring.jwks()["keys"]) == 1
    with pytest.raises(ValueError):
        KeyRing.from_config([], generate_if_empty=False)
    paths = []
    keys = [SigningKey.generate(), SigningKey.generate("RS256")]
    for i, key in enumerate(keys):
        path = tmp_path / f"k{i}.pem"
        path.write_bytes(
            key.private_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        paths.append(str(path))
    ring = KeyRing.from_config(paths, clock=clock)
    assert ring.signer.kid == keys[1].kid  # the last path signs
    assert ring.algorithms() == ["ES256", "RS256"]
    assert ring.verify(ring.sign(claims()), audience=AUD)["sub"] == "alice"
