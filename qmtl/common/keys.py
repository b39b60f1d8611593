"""Signing keys, JWKS and key rotation for the event-stream descriptor tokens (SPEC §5).

A :class:`KeyRing` holds one signing key and the keys that may still verify:

* ``sign`` uses the current (newest) key and puts its ``kid`` in the header;
* ``rotate(new)`` makes ``new`` the signer; the previous signer stays in the JWKS and keeps
  verifying until every token it signed has expired (``retired_at + token_ttl``, or later if
  it signed a token with a longer ttl), then drops out;
* ``stage(new)`` publishes a key in the JWKS before it signs (verifiers that cache the JWKS,
  such as PyJWT's ``PyJWKClient``, re-fetch an unknown ``kid`` only after a cooldown), and
  ``rotate(new)`` later switches to it;
* ``verify`` accepts only the algorithm of the key named by ``kid`` — never the algorithm a
  token claims for itself — so ``alg: none`` and HS256-with-the-public-key forgeries fail.

Time claims (``iat``, ``exp``, ``nbf``) are checked here with the ring's injectable clock
(PyJWT reads the wall clock itself); PyJWT checks the signature and the audience.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Callable
from os import PathLike
from pathlib import Path
from typing import Any, cast

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

__all__ = ["SUPPORTED_ALGORITHMS", "InvalidToken", "KeyRing", "SigningKey"]

SUPPORTED_ALGORITHMS = ("ES256", "RS256")
DEFAULT_TOKEN_TTL = 300.0


class InvalidToken(Exception):
    """A token was refused; ``reason`` is short and safe to log (e.g. ``"expired"``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_uint(value: int, length: int | None = None) -> str:
    length = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return _b64url(value.to_bytes(length, "big"))


class SigningKey:
    """An asymmetric private key with its ``kid`` and JWS algorithm (ES256 or RS256)."""

    def __init__(
        self,
        private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
        *,
        algorithm: str = "ES256",
        kid: str | None = None,
        created_at: float | None = None,
    ) -> None:
        if algorithm == "ES256":
            if not isinstance(private_key, ec.EllipticCurvePrivateKey) or not isinstance(
                private_key.curve, ec.SECP256R1
            ):
                raise ValueError("ES256 needs a P-256 elliptic-curve private key")
        elif algorithm == "RS256":
            if not isinstance(private_key, rsa.RSAPrivateKey):
                raise ValueError("RS256 needs an RSA private key")
            if private_key.key_size < 2048:
                raise ValueError("RS256 keys must be at least 2048 bits")
        else:
            raise ValueError(f"unsupported algorithm {algorithm!r}; use one of {SUPPORTED_ALGORITHMS}")
        self.private_key = private_key
        self.public_key = private_key.public_key()
        self.algorithm = algorithm
        self.kid = kid if kid is not None else self.thumbprint()
        self.created_at = created_at if created_at is not None else time.time()

    @classmethod
    def generate(cls, algorithm: str = "ES256", kid: str | None = None, *, created_at: float | None = None) -> SigningKey:
        """A fresh key: P-256 for ES256, 2048-bit RSA for RS256."""
        if algorithm == "ES256":
            private_key: Any = ec.generate_private_key(ec.SECP256R1())
        elif algorithm == "RS256":
            private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            raise ValueError(f"unsupported algorithm {algorithm!r}; use one of {SUPPORTED_ALGORITHMS}")
        return cls(private_key, algorithm=algorithm, kid=kid, created_at=created_at)

    @classmethod
    def from_pem(
        cls,
        path_or_bytes: str | PathLike[str] | bytes,
        kid: str | None = None,
        *,
        password: bytes | None = None,
        created_at: float | None = None,
    ) -> SigningKey:
        """Load an unencrypted (or ``password``-protected) PEM private key.

        ``bytes`` are PEM content; ``str``/path-like is a file path. The algorithm follows
        the key type: P-256 → ES256, RSA → RS256.
        """
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        pem = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
        private_key = load_pem_private_key(pem, password=password)
        algorithm = "RS256" if isinstance(private_key, rsa.RSAPrivateKey) else "ES256"
        # any other key type (DSA, Ed25519, ...) is refused by __init__ with a ValueError naming what it needs
        return cls(private_key, algorithm=algorithm, kid=kid, created_at=created_at)  # type: ignore[arg-type]

    def _required_jwk_members(self) -> dict[str, str]:
        """The RFC 7638 required members of the public JWK."""
        numbers = self.public_key.public_numbers()
        if self.algorithm == "ES256":  # the algorithm follows the key type (constructor)
            ec_numbers = cast(ec.EllipticCurvePublicNumbers, numbers)
            return {"crv": "P-256", "kty": "EC", "x": _b64url_uint(ec_numbers.x, 32), "y": _b64url_uint(ec_numbers.y, 32)}
        rsa_numbers = cast(rsa.RSAPublicNumbers, numbers)
        return {"e": _b64url_uint(rsa_numbers.e), "kty": "RSA", "n": _b64url_uint(rsa_numbers.n)}

    def thumbprint(self) -> str:
        """RFC 7638 JWK SHA-256 thumbprint, base64url without padding."""
        canonical = json.dumps(self._required_jwk_members(), sort_keys=True, separators=(",", ":"))
        return _b64url(hashlib.sha256(canonical.encode()).digest())

    def public_jwk(self) -> dict[str, str]:
        """The public key as a JWK with ``kid``, ``alg`` and ``use: "sig"``."""
        return {**self._required_jwk_members(), "kid": self.kid, "alg": self.algorithm, "use": "sig"}

    def __repr__(self) -> str:  # never show key material
        return f"SigningKey(kid={self.kid!r}, algorithm={self.algorithm!r})"


class KeyRing:
    """The current signing key plus the keys that may still verify (see module docstring)."""

    def __init__(
        self,
        keys: list[SigningKey],
        *,
        token_ttl: float = DEFAULT_TOKEN_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``keys``: the newest (largest ``created_at``; on a tie, the later in the list) signs.

        The others are treated as retired now: they verify for another ``token_ttl`` seconds.
        """
        if not keys:
            raise ValueError("a KeyRing needs at least one key")
        if len({k.kid for k in keys}) != len(keys):
            raise ValueError("duplicate kid in KeyRing")
        self.token_ttl = token_ttl
        self._clock = clock
        now = clock()
        newest = max(range(len(keys)), key=lambda i: (keys[i].created_at, i))
        self._signer = keys[newest]
        self._keys: dict[str, SigningKey] = {k.kid: k for k in keys}
        # kid -> time after which the (non-signing) key no longer verifies; None = staged.
        self._drop_at: dict[str, float | None] = {k.kid: now + token_ttl for k in keys if k is not self._signer}
        self._last_exp: dict[str, float] = {}  # kid -> latest exp signed with it

    @classmethod
    def from_config(
        cls,
        paths: list[str] | None,
        *,
        generate_if_empty: bool = True,
        token_ttl: float = DEFAULT_TOKEN_TTL,
        clock: Callable[[], float] = time.time,
    ) -> KeyRing:
        """Load PEM keys; the **last** path signs, the others verify for one ``token_ttl``.

        With no paths, generate one ES256 key (tokens then do not survive a restart) unless
        ``generate_if_empty`` is false, in which case raise ValueError.
        """
        if paths:
            now = clock()
            keys = [SigningKey.from_pem(p, created_at=now) for p in paths]
        elif generate_if_empty:
            keys = [SigningKey.generate("ES256", created_at=clock())]
        else:
            raise ValueError("no signing key configured")
        return cls(keys, token_ttl=token_ttl, clock=clock)

    @classmethod
    def from_schedule(
        cls,
        signer: SigningKey,
        *,
        retired: list[tuple[SigningKey, float]] = (),  # type: ignore[assignment]
        staged: list[SigningKey] = (),  # type: ignore[assignment]
        token_ttl: float = DEFAULT_TOKEN_TTL,
        clock: Callable[[], float] = time.time,
    ) -> KeyRing:
        """A ring built from a shared schedule (e.g. the Gateway's key table): ``signer`` signs,
        each ``(key, drop_at)`` of ``retired`` verifies until ``drop_at`` (epoch seconds), each
        ``staged`` key verifies and is published before it signs."""
        ring = cls([signer], token_ttl=token_ttl, clock=clock)
        now = clock()
        for key, drop_at in retired:
            if key.kid in ring._keys or drop_at <= now:
                continue
            ring._keys[key.kid] = key
            ring._drop_at[key.kid] = drop_at
        for key in staged:
            if key.kid not in ring._keys:
                ring.stage(key)
        return ring

    def describe(self) -> list[dict[str, Any]]:
        """Every key of the ring: ``kid``, ``alg``, ``role`` (signing | verifying | staged) and,
        for a retired key, ``verifies_until`` (epoch seconds). No key material."""
        self._prune()
        out: list[dict[str, Any]] = []
        for kid, key in self._keys.items():
            if key is self._signer:
                out.append({"kid": kid, "alg": key.algorithm, "role": "signing"})
            elif self._drop_at.get(kid) is None:
                out.append({"kid": kid, "alg": key.algorithm, "role": "staged"})
            else:
                until = max(self._drop_at[kid] or 0.0, self._last_exp.get(kid, 0.0))
                out.append({"kid": kid, "alg": key.algorithm, "role": "verifying", "verifies_until": until})
        out.sort(key=lambda d: (d["role"] != "signing", d["kid"]))
        return out

    # -- key management ----------------------------------------------------------------
    @property
    def signer(self) -> SigningKey:
        return self._signer

    def _prune(self) -> None:
        now = self._clock()
        for kid, drop_at in list(self._drop_at.items()):
            if drop_at is not None and now >= max(drop_at, self._last_exp.get(kid, 0.0)):
                del self._drop_at[kid], self._keys[kid]
                self._last_exp.pop(kid, None)

    def stage(self, key: SigningKey) -> None:
        """Publish ``key`` in the JWKS (and accept it for verification) before it signs."""
        if key.kid in self._keys:
            raise ValueError(f"kid {key.kid!r} already in the ring")
        self._keys[key.kid] = key
        self._drop_at[key.kid] = None

    def rotate(self, new_key: SigningKey) -> None:
        """Make ``new_key`` (new, or staged earlier) the signer; retire the current signer."""
        self._prune()
        staged = self._drop_at.get(new_key.kid, 0.0) is None and self._keys[new_key.kid] is new_key
        if new_key.kid in self._keys and not staged:
            raise ValueError(f"kid {new_key.kid!r} already in the ring")
        old = self._signer
        self._keys[new_key.kid] = new_key
        self._drop_at.pop(new_key.kid, None)
        self._drop_at[old.kid] = self._clock() + self.token_ttl
        self._signer = new_key

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The JWKS document: signer first, then staged and still-valid retired keys."""
        self._prune()
        others = [k.public_jwk() for kid, k in self._keys.items() if k is not self._signer]
        return {"keys": [self._signer.public_jwk(), *others]}

    def algorithms(self) -> list[str]:
        """The algorithms of the keys that currently verify."""
        self._prune()
        return sorted({k.algorithm for k in self._keys.values()})

    # -- tokens ------------------------------------------------------------------------
    def sign(self, claims: dict[str, Any], *, ttl: float | None = None) -> str:
        """Sign ``claims`` with the current key, adding ``iat``, ``exp`` and ``jti`` unless given."""
        now = self._clock()
        payload = dict(claims)
        payload.setdefault("iat", int(now))
        payload.setdefault("exp", int(now + (self.token_ttl if ttl is None else ttl)))
        payload.setdefault("jti", uuid.uuid4().hex)
        key = self._signer
        if isinstance(payload["exp"], (int, float)):
            self._last_exp[key.kid] = max(self._last_exp.get(key.kid, 0.0), float(payload["exp"]))
        return jwt.encode(payload, key.private_key, algorithm=key.algorithm, headers={"kid": key.kid})

    def verify(self, token: str, *, audience: str, leeway: float = 0) -> dict[str, Any]:
        """The token's claims if valid; raise :class:`InvalidToken` otherwise.

        Reasons: ``malformed``, ``algorithm not allowed``, ``unknown kid``, ``bad signature``,
        ``bad audience``, ``expired``, ``not yet valid``.
        """
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.InvalidTokenError, TypeError, ValueError):
            raise InvalidToken("malformed") from None
        self._prune()
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in {k.algorithm for k in self._keys.values()}:
            raise InvalidToken("algorithm not allowed")
        kid = header.get("kid")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise InvalidToken("unknown kid")
        try:
            claims = jwt.decode(
                token,
                key.public_key,
                algorithms=[key.algorithm],
                audience=audience,
                options={"require": ["exp"], "verify_exp": False, "verify_iat": False, "verify_nbf": False},
            )
        except jwt.InvalidAlgorithmError:
            raise InvalidToken("algorithm not allowed") from None
        except jwt.InvalidSignatureError:
            raise InvalidToken("bad signature") from None
        except (jwt.InvalidAudienceError, jwt.MissingRequiredClaimError) as exc:
            if isinstance(exc, jwt.MissingRequiredClaimError) and exc.claim != "aud":
                raise InvalidToken("malformed") from None
            raise InvalidToken("bad audience") from None
        except jwt.InvalidTokenError:
            raise InvalidToken("malformed") from None
        self._check_times(claims, leeway)
        return claims

    def _check_times(self, claims: dict[str, Any], leeway: float) -> None:
        now = self._clock()
        for name in ("exp", "iat", "nbf"):
            value = claims.get(name)
            if name in claims and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise InvalidToken("malformed")
        if now >= claims["exp"] + leeway:
            raise InvalidToken("expired")
        if claims.get("nbf", float("-inf")) > now + leeway or claims.get("iat", float("-inf")) > now + leeway:
            raise InvalidToken("not yet valid")
