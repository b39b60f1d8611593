"""Authentication before anything else, per operation, from the spec's ``security``.

:class:`SpecSecurity` is a pure ASGI middleware that takes the place of Connexion's
``SecurityMiddleware`` in the ``AsyncApp`` middleware list: after routing (it reads the
operation Connexion resolved) and before request validation, so a request that fails
authentication is answered 401/403 problem+json before its body is read or parsed.

The rule of an operation is its ``security`` (or the document's): a list of alternatives,
each a set of schemes that must all hold. A service passes one *verifier* per scheme name
it declares under ``components.securitySchemes``; a verifier is
``async (scope, headers, operation) -> identity | None``: ``None`` when the request
presents no credential of that scheme, an identity when it presents a valid one, and it
raises (``Unauthorized``/``Forbidden``) for one that is presented but wrong. The empty
alternative ``{}`` admits a request only through the ``anonymous`` callable (the
Gateway's development mode; ``None`` = never). The identity of the first alternative that
holds is stored in ``scope["qmtl.identity"]`` for later middlewares and handlers.
An operation whose only alternative is ``{}`` (``security: [{}]``) is public.

A scheme named in the spec without a verifier stops the service at startup (a spec that
promises authentication is never served without it).
"""

from __future__ import annotations

import typing as t

from starlette.types import ASGIApp, Receive, Scope, Send

from qmtl.common import logs
from qmtl.common.errors import Forbidden, Unauthorized

IDENTITY_KEY = "qmtl.identity"
ROUTING_CONTEXT = "connexion_routing"  # connexion.middleware.abstract.ROUTING_CONTEXT

Verifier = t.Callable[[Scope, t.Mapping[str, str], t.Mapping[str, t.Any]], t.Awaitable[t.Any]]

_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


class Rule(t.NamedTuple):
    alternatives: tuple[tuple[str, ...], ...]  # () = no security at all
    operation: t.Mapping[str, t.Any]


def operation_rules(doc: t.Mapping[str, t.Any]) -> dict[str, Rule]:
    """operationId → its security rule (the operation's ``security``, else the document's)."""
    default = doc.get("security") or []
    rules: dict[str, Rule] = {}
    for item in (doc.get("paths") or {}).values():
        for method, op in item.items():
            if method not in _METHODS or not isinstance(op, dict) or "operationId" not in op:
                continue
            security = op.get("security", default)
            alternatives = tuple(tuple(req) for req in security)
            if not any(alternatives):  # [] or [{}]: public
                alternatives = ()
            rules[op["operationId"]] = Rule(alternatives, op)
    return rules


def scheme_names(doc: t.Mapping[str, t.Any]) -> set[str]:
    used: set[str] = set()
    for rule in operation_rules(doc).values():
        for alt in rule.alternatives:
            used.update(alt)
    return used


def describe_schemes(doc: t.Mapping[str, t.Any], names: t.Iterable[str]) -> str:
    schemes = (doc.get("components") or {}).get("securitySchemes") or {}
    out = []
    for name in names:
        s = schemes.get(name) or {}
        if s.get("type") == "apiKey":
            out.append(f"{s.get('name')} {s.get('in')}")
        elif s.get("type") == "http":
            out.append(f"Authorization: {str(s.get('scheme', '')).capitalize()}")
        else:
            out.append(name)
    return " or ".join(out)


class SpecSecurity:
    def __init__(
        self,
        app: ASGIApp,
        *,
        doc: t.Mapping[str, t.Any],
        verifiers: t.Mapping[str, Verifier],
        anonymous: t.Callable[[], t.Awaitable[t.Any]] | None = None,
    ) -> None:
        self.app = app
        self.rules = operation_rules(doc)
        self.verifiers = dict(verifiers)
        self.anonymous = anonymous
        missing = scheme_names(doc) - set(self.verifiers)
        if missing:
            raise ValueError(f"the spec requires security scheme(s) {sorted(missing)} but no verifier is configured for them")
        schemes = (doc.get("components") or {}).get("securitySchemes") or {}
        self._bearer = {n for n, s in schemes.items() if s.get("type") == "http" and str(s.get("scheme", "")).lower() == "bearer"}
        self._accepts = {op_id: describe_schemes(doc, sorted({s for alt in rule.alternatives for s in alt}))
                         for op_id, rule in self.rules.items()}

    def rule_for(self, scope: Scope) -> tuple[str, Rule] | None:
        routing = (scope.get("extensions") or {}).get(ROUTING_CONTEXT) or {}
        op_id = routing.get("operation_id")
        if not op_id:
            return None
        raw = op_id.rsplit(".", 1)[-1]  # the resolver prefixes handlers.<service>.<tag>.
        rule = self.rules.get(raw)
        return (raw, rule) if rule is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        found = self.rule_for(scope)
        if found is not None and found[1].alternatives:
            scope[IDENTITY_KEY] = identity = await self.authenticate(scope, *found)
            logs.caller_subject.set(getattr(identity, "subject", None))  # for the access line
        await self.app(scope, receive, send)

    async def authenticate(self, scope: Scope, op_id: str, rule: Rule) -> t.Any:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}
        anonymous_allowed = False
        for alt in rule.alternatives:
            if not alt:
                anonymous_allowed = True
                continue
            identity = None
            for name in alt:  # every scheme of an alternative must hold
                got = await self.verifiers[name](scope, headers, rule.operation)
                if got is None:
                    identity = None
                    break
                identity = identity or got
            if identity is not None:
                return identity
        if anonymous_allowed and self.anonymous is not None:
            identity = await self.anonymous()
            if identity is not None:
                return identity
        accepts = self._accepts.get(op_id) or "a credential"
        bearer_accepted = any(self.verifiers.get(n) is not None and n in self._bearer for alt in rule.alternatives for n in alt)
        if "authorization" in headers and not bearer_accepted:
            # e.g. a caller's bearer JWT on a service-to-service route
            raise Forbidden(f"this operation is service-to-service: a caller's token is not accepted; it needs {accepts}")
        if bearer_accepted:
            raise Unauthorized(f"a bearer token is required (this operation accepts {accepts})",
                               headers={"WWW-Authenticate": 'Bearer realm="qmtl"'})
        raise Unauthorized(f"a service credential is required: this operation needs {accepts}")


# -- the service credential -------------------------------------------------------------------
TRUSTED_NETWORKS_EXTENSION = "x-qmtl-trusted-networks"  # operation flag: callers may be admitted by address


class ServiceCaller(t.NamedTuple):
    """The identity of a service-to-service request (``via``: ``token``, ``network`` or
    ``open`` when the service has no token configured)."""

    subject: str
    via: str
    claims: t.Mapping[str, t.Any] = {}
    anonymous_dev: bool = False


def parse_networks(cidrs: t.Iterable[str], where: str) -> tuple:
    import ipaddress

    out = []
    for c in cidrs:
        try:
            out.append(ipaddress.ip_network(str(c).strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"{where}: {c!r} is not a CIDR network: {exc}") from None
    return tuple(out)


def client_in(scope: Scope, networks: tuple) -> str | None:
    """The TCP peer's address when it lies in one of ``networks`` (never a forwarded header)."""
    import ipaddress

    client = scope.get("client")
    if not networks or not client:
        return None
    try:
        addr = ipaddress.ip_address(client[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr) if any(addr in net for net in networks) else None


def api_key_header(service: str, scheme: str) -> str:
    """The header an ``apiKey`` security scheme of ``service``'s spec names (lower-case)."""
    from qmtl.contracts.loader import load_openapi

    schemes = (load_openapi(service).bundled.get("components") or {}).get("securitySchemes") or {}
    s = schemes.get(scheme) or {}
    if s.get("type") != "apiKey" or s.get("in") != "header" or not s.get("name"):
        raise ValueError(f"the {service} spec has no header apiKey security scheme {scheme!r}")
    return str(s["name"]).lower()


def service_token_verifier(token: str, *, header: str, trusted_networks: tuple = (), open_when_unset: bool = False) -> Verifier:
    """Verifier of the service-token scheme (``header``, from the spec: see
    :func:`api_key_header`): the header equal to ``token``
    (constant-time compare); without the header, a peer inside ``trusted_networks`` on an
    operation flagged ``x-qmtl-trusted-networks``. ``open_when_unset``: with no token
    configured, every request passes (development; the service warns at startup)."""
    import hmac

    expected = token.encode() if token else b""
    header = header.lower()

    async def verify(scope: Scope, headers: t.Mapping[str, str], operation: t.Mapping[str, t.Any]) -> t.Any:
        if not expected and open_when_unset:
            return ServiceCaller("unauthenticated", "open", anonymous_dev=True)
        presented = headers.get(header)
        if presented is not None:
            if expected and hmac.compare_digest(expected, presented.encode("latin-1")):
                return ServiceCaller("service", "token")
            raise Unauthorized(f"the {header} header does not hold this service's token")
        if operation.get(TRUSTED_NETWORKS_EXTENSION):
            peer = client_in(scope, trusted_networks)
            if peer is not None:
                return ServiceCaller(f"network:{peer}", "network")
        return None

    return verify
