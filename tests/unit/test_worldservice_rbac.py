"""WorldService identity and roles: the trust rule for forwarded identity, dev and enforce modes."""

from __future__ import annotations

import pytest

from qmtl.common.errors import Forbidden, Unauthorized
from qmtl.worldservice.rbac import Authenticator, Identity, decode_claims, encode_claims

TOKEN = "s3cret-token"


def headers(subject="alice", roles=None, token=TOKEN, **claims):
    h = {"X-QMTL-Subject": subject, "X-QMTL-Claims": encode_claims({"world_roles": roles or {}, **claims})}
    if token is not None:
        h["X-QMTL-Service-Token"] = token
    return h


def test_roles_imply_each_other_and_star_applies_everywhere():
    who = Identity.from_claims("a", {"world_roles": {"w1": ["owner"], "w2": ["reader"], "*": ["operator"]}})
    assert who.roles_on("w1") == {"owner", "operator", "reader"}
    assert who.roles_on("w2") == {"operator", "reader"}
    assert who.roles_on("w9") == {"operator", "reader"}
    assert not who.has("w2", "owner")


def test_unknown_roles_are_ignored_and_a_single_string_is_accepted():
    who = Identity.from_claims("a", {"world_roles": {"w1": "reader", "w2": ["admin"]}})
    assert who.roles_on("w1") == {"reader"} and who.roles_on("w2") == set()


@pytest.mark.parametrize("roles", [["reader", 3], "x" and 5, {"a": 1}])
def test_malformed_world_roles_are_unauthorized(roles):
    with pytest.raises(Unauthorized):
        Identity.from_claims("a", {"world_roles": {"w": roles}})


def test_require_raises_forbidden_naming_the_role():
    who = Identity.from_claims("bob", {"world_roles": {"w1": ["reader"]}})
    with pytest.raises(Forbidden, match="needs the 'operator' role on world 'w1'") as info:
        who.require("w1", "operator", "applying a plan")
    assert info.value.ext == {"required_role": "operator", "world_id": "w1"}


def test_enforce_trusts_identity_only_with_the_service_token():
    auth = Authenticator(mode="enforce", service_token=TOKEN, dev_subject="dev")
    who = auth.identify(headers(roles={"w1": ["operator"]}))
    assert who.subject == "alice" and who.has("w1", "operator") and not who.dev
    with pytest.raises(Unauthorized):
        auth.identify(headers(roles={"*": ["owner"]}, token=None))  # forged: no token
    with pytest.raises(Unauthorized):
        auth.identify(headers(roles={"*": ["owner"]}, token="wrong"))
    with pytest.raises(Unauthorized):
        auth.identify({})


def test_header_names_are_case_insensitive():
    auth = Authenticator(mode="enforce", service_token=TOKEN, dev_subject="dev")
    h = {k.lower(): v for k, v in headers(roles={"w": ["reader"]}).items()}
    assert auth.identify(h).has("w", "reader")


def test_dev_mode_gives_the_dev_subject_every_role_but_trusted_identities_keep_theirs():
    auth = Authenticator(mode="dev", service_token=TOKEN, dev_subject="dev-user")
    anon = auth.identify({"X-QMTL-Subject": "mallory", "X-QMTL-Claims": encode_claims({"world_roles": {}})})
    assert anon.subject == "dev-user" and anon.dev and anon.has("any", "owner")
    who = auth.identify(headers(roles={"w1": ["reader"]}))
    assert who.subject == "alice" and not who.has("w1", "operator")


def test_no_configured_token_trusts_nobody():
    auth = Authenticator(mode="enforce", service_token="", dev_subject="dev")
    with pytest.raises(Unauthorized):
        auth.identify(headers(token=""))


def test_subject_falls_back_to_the_sub_claim_and_is_required():
    auth = Authenticator(mode="enforce", service_token=TOKEN, dev_subject="dev")
    h = headers(roles={}, sub="carol")
    del h["X-QMTL-Subject"]
    assert auth.identify(h).subject == "carol"
    h = headers(roles={})
    del h["X-QMTL-Subject"]
    with pytest.raises(Unauthorized, match="no subject"):
        auth.identify(h)


@pytest.mark.parametrize("value", ["%%%", "bm90IGpzb24", encode_claims({"a": 1})[:-3] + "!!", "WzEsMl0"])
def test_unreadable_claims_are_unauthorized(value):
    auth = Authenticator(mode="dev", service_token=TOKEN, dev_subject="dev")
    with pytest.raises(Unauthorized):
        auth.identify({"X-QMTL-Service-Token": TOKEN, "X-QMTL-Subject": "a", "X-QMTL-Claims": value})


def test_claims_round_trip_with_or_without_padding():
    claims = {"sub": "a", "world_roles": {"w": ["reader"]}}
    enc = encode_claims(claims)
    assert "=" not in enc and decode_claims(enc) == claims
    assert decode_claims(enc + "=" * (-len(enc) % 4)) == claims
