"""The spec-driven security middleware (qmtl.contracts.security): rules from the spec,
alternatives, anonymous, service token and trusted networks, and that refusals happen
before the body is read; BoundedLabel; in-band refresh scope checks."""

from __future__ import annotations

import pytest

from qmtl.common.errors import Forbidden, Unauthorized
from qmtl.common.labels import BoundedLabel
from qmtl.contracts.security import IDENTITY_KEY, SpecSecurity, operation_rules, parse_networks, service_token_verifier

DOC = {
    "security": [{"bearerAuth": []}, {}],
    "components": {"securitySchemes": {
        "bearerAuth": {"type": "http", "scheme": "bearer"},
        "serviceToken": {"type": "apiKey", "in": "header", "name": "X-QMTL-Service-Token"},
    }},
    "paths": {
        "/a": {"post": {"operationId": "caller_op"}},
        "/h": {"get": {"operationId": "public_op", "security": [{}]}},
        "/cb": {"post": {"operationId": "service_op", "security": [{"serviceToken": []}], "x-qmtl-trusted-networks": True}},
    },
}


async def bearer(_scope, headers, _op):
    auth = headers.get("authorization")
    if not auth:
        return None
    if auth != "Bearer good":
        raise Unauthorized("bad token")
    return "caller"


def scope(op_id: str, headers: dict[str, str] | None = None, client=("127.0.0.1", 5000)) -> dict:
    return {"type": "http", "client": client, "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
            "extensions": {"connexion_routing": {"operation_id": f"handlers.gateway.x.{op_id}"}}}


class App:
    def __init__(self) -> None:
        self.called = 0
        self.identity = None

    async def __call__(self, scope, receive, send):
        self.called += 1
        self.identity = scope.get(IDENTITY_KEY)


async def never_receive():
    raise AssertionError("the body was read before authentication")


def middleware(dev: bool = False, networks=("127.0.0.2/32",)):
    app = App()

    async def anonymous():
        return "dev-user" if dev else None

    verifiers = {"bearerAuth": bearer,
                 "serviceToken": service_token_verifier("s3cret", header="X-QMTL-Service-Token", trusted_networks=parse_networks(networks, "test"))}
    return SpecSecurity(app, doc=DOC, verifiers=verifiers, anonymous=anonymous), app


def test_rules_come_from_the_spec():
    rules = operation_rules(DOC)
    assert rules["caller_op"].alternatives == (("bearerAuth",), ())
    assert rules["public_op"].alternatives == ()  # [{}] alone: public
    assert rules["service_op"].alternatives == (("serviceToken",),)


def test_a_scheme_without_a_verifier_stops_the_service():
    with pytest.raises(ValueError, match="serviceToken"):
        SpecSecurity(App(), doc=DOC, verifiers={"bearerAuth": bearer})


@pytest.mark.parametrize("dev,headers,outcome", [
    (False, {}, Unauthorized),
    (True, {}, "dev-user"),
    (False, {"Authorization": "Bearer good"}, "caller"),
    (True, {"Authorization": "Bearer bad"}, Unauthorized),  # a token presented is verified even in dev mode
    (False, {"X-QMTL-Service-Token": "s3cret"}, Unauthorized),  # the service token is not a caller credential
])
async def test_caller_operations(dev, headers, outcome):
    mw, app = middleware(dev)
    if isinstance(outcome, type):
        with pytest.raises(outcome):
            await mw(scope("caller_op", headers), never_receive, None)
        assert app.called == 0
    else:
        await mw(scope("caller_op", headers), never_receive, None)
        assert app.identity == outcome


@pytest.mark.parametrize("headers,client,outcome", [
    ({"X-QMTL-Service-Token": "s3cret"}, ("127.0.0.1", 1), "token"),
    ({}, ("127.0.0.2", 1), "network"),
    ({}, ("::ffff:127.0.0.2", 1), "network"),
    ({}, ("127.0.0.1", 1), Unauthorized),
    ({"X-QMTL-Service-Token": "s3cre"}, ("127.0.0.2", 1), Unauthorized),  # a wrong token is wrong, wherever it comes from
    ({"Authorization": "Bearer good"}, ("127.0.0.1", 1), Forbidden),  # a caller's valid token: never
    ({"X-Forwarded-For": "127.0.0.2"}, ("127.0.0.1", 1), Unauthorized),
])
async def test_service_operations(headers, client, outcome):
    mw, app = middleware(dev=True)  # even in development mode
    if isinstance(outcome, type):
        with pytest.raises(outcome):
            await mw(scope("service_op", headers, client), never_receive, None)
        assert app.called == 0
    else:
        await mw(scope("service_op", headers, client), never_receive, None)
        assert app.identity.via == outcome


async def test_public_operations_and_unknown_routes_pass():
    mw, app = middleware()
    await mw(scope("public_op"), never_receive, None)
    s = scope("nope")
    s["extensions"]["connexion_routing"]["operation_id"] = None
    await mw(s, never_receive, None)
    assert app.called == 2 and app.identity is None


def test_trusted_networks_must_be_cidrs():
    with pytest.raises(ValueError, match=r"gateway\.callbacks\.trusted_networks"):
        parse_networks(["10.0.0.0/8", "not-a-network"], "gateway.callbacks.trusted_networks")


def test_bounded_label_folds_beyond_the_cap_and_frees_on_release():
    label = BoundedLabel(2)
    assert [label(v) for v in ("a", "b", "c", "a", "other")] == ["a", "b", "other", "a", "other"]
    assert label.release("a") and not label.release("c")
    assert label("c") == "c" and len(label) == 2


async def test_in_band_refresh_needs_the_same_subject_and_scope(tmp_path):
    from qmtl.gateway.events.component import EventsComponent
    from qmtl.gateway.events.hub import Subscriber
    from qmtl.gateway.events.tokens import Tokens

    comp = EventsComponent.__new__(EventsComponent)  # only .tokens and .auth are used by refresh
    comp.tokens = Tokens(signing_keys=[], data_dir=str(tmp_path), token_ttl=60, algorithm="ES256", issuer="http://gw")
    comp.auth = None  # on /ws/evt a refresh never asks it
    sub = Subscriber("/ws/evt", topics=["activation", "policy"], world_id="w1", snapshots=True, subject="alice")
    sub.expires_at = 1.0

    def token(**kw):
        args = {"subject": "alice", "topics": ["activation", "policy"], "world_id": "w1", "strategy_id": None, "queue_keys": []}
        args.update(kw)
        return comp.tokens.issue(**args)[0]

    for bad, why in ((token(subject="mallory"), "subject"), (token(world_id="w2"), "world"),
                     (token(topics=["activation"]), "topics"), ("garbage", "malformed")):
        with pytest.raises(ValueError, match=why):
            await comp.refresh(sub, bad)
        assert sub.expires_at == 1.0
    assert await comp.refresh(sub, token()) > 1.0


def test_a_bad_trusted_network_is_a_config_error():
    from qmtl.common.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="trusted_networks: 'nope'"):
        load_config(environ={"QMTL__GATEWAY__CALLBACKS__TRUSTED_NETWORKS": '["10.0.0.0/8", "nope"]'})
    cfg = load_config(environ={"QMTL__GATEWAY__CALLBACKS__TRUSTED_NETWORKS": '["10.0.0.0/8", "::1/128"]'})
    assert cfg.gateway.callbacks.trusted_networks == ["10.0.0.0/8", "::1/128"]
