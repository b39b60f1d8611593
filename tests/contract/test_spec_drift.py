"""Spec drift: the contract lives in specs/, and the Python follows it.

* Edit a copy of specs/ (add an enum value, rename a topic, a path, a parameter, change a
  proxy rule) and load it: the derived constants, the fast paths' routes and the proxy rules
  follow; a malformed ``x-qmtl-proxy`` or one whose WorldService operation does not match is
  refused by the loader (so by ``qmtl check-specs`` and at startup).
* The generated SDK types are not stale, and the generator follows an edited spec.
* Every member of a derived enum that the code names exists in the spec; a renamed value
  would be caught here, not at runtime.
* Known contract literals do not reappear in qmtl/ or handlers/ (a small allow-list).
"""

from __future__ import annotations

import ast
import asyncio
import io
import json
import shutil
import tokenize
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from qmtl.contracts import constants as c
from qmtl.contracts.loader import SPECS_DIR, SpecError, load_all, load_openapi
from qmtl.gateway.ingest.fastpath import SubmitFastPath
from qmtl.gateway.worlds import DecideFastPath

ROOT = Path(__file__).resolve().parents[2]
CODE_DIRS = ("qmtl", "handlers")
GENERATED = {"qmtl/sdk/types.py", "qmtl/contracts/enums.py"}  # generated from the specs (scripts/gen_sdk_types.py)


# --------------------------------------------------------------------------- helpers


def copy_specs(tmp_path: Path) -> Path:
    dst = tmp_path / "specs"
    shutil.copytree(SPECS_DIR, dst)
    return dst


def edit_json(path: Path, fn: Any) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc, indent=2))


def edit_yaml(path: Path, fn: Any) -> None:
    doc = yaml.safe_load(path.read_text())
    fn(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def gateway_op(doc: dict, operation_id: str) -> dict:
    for item in doc["paths"].values():
        for op in item.values():
            if isinstance(op, dict) and op.get("operationId") == operation_id:
                return op
    raise KeyError(operation_id)


def rename_path(doc: dict, old: str, new: str) -> None:
    doc["paths"] = {(new if k == old else k): v for k, v in doc["paths"].items()}


def code_files() -> list[Path]:
    return sorted(p for d in CODE_DIRS for p in (ROOT / d).rglob("*.py"))


def rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


# --------------------------------------------------------------------------- derived constants


def test_module_constants_are_the_specs():
    fresh = c.derive()
    assert set(c.ENUMS) == set(fresh.enums) == set(c.ENUM_SOURCES)
    for name, enum in c.ENUMS.items():
        assert enum.__name__ == name
        assert [(m.name, m.value) for m in enum] == [(m.name, m.value) for m in fresh.enums[name]]
    assert tuple(c.schema_enum("decision_envelope.schema.json", "/properties/effective_mode")) == c.MODES
    assert tuple(json.loads((SPECS_DIR / "schemas/strategy_status.schema.json").read_text())["properties"]["status"]["enum"]) == c.STRATEGY_STATES
    channels = yaml.safe_load((SPECS_DIR / "asyncapi.yaml").read_text())["channels"]
    assert set(c.CONTROL_TOPICS) == {ch["bindings"]["kafka"]["topic"] for ch in channels.values() if "kafka" in (ch.get("bindings") or {})}


def test_derived_constants_follow_an_edited_spec(tmp_path):
    specs = copy_specs(tmp_path)
    edit_json(specs / "schemas/decision_envelope.schema.json", lambda d: d["properties"]["effective_mode"]["enum"].append("paper"))
    edit_json(specs / "schemas/strategy_status.schema.json", lambda d: d["properties"]["status"]["enum"].insert(1, "validated"))
    edit_json(specs / "schemas/tag_query_node.schema.json", lambda d: d["properties"]["match_mode"].update(enum=["any", "all", "none"]))
    edit_json(specs / "schemas/stream_descriptor.schema.json", lambda d: d["properties"]["topics"]["items"]["enum"].append("sentinel"))

    def topic(doc: dict) -> None:
        ch = doc["channels"]["controlPolicy"]
        ch["address"] = ch["bindings"]["kafka"]["topic"] = "ctl.policy.v2"

    edit_yaml(specs / "asyncapi.yaml", topic)
    derived = c.derive(specs)
    assert [m.value for m in derived.Mode] == ["backtest", "dryrun", "live", "paper"]
    assert derived.Mode.PAPER == "paper"
    assert [m.value for m in derived.StrategyState] == ["queued", "validated", "processing", "diffed", "completed", "failed"]
    assert [m.value for m in derived.MatchMode] == ["any", "all", "none"]
    assert "sentinel" in [m.value for m in derived.StreamTopic]
    assert derived.topics == {"activation": "control.activation", "policy": "ctl.policy.v2", "queues": "control.queues"}
    # and the running code's constants are untouched (they come from the real specs)
    assert "paper" not in c.MODES and c.TOPIC_POLICY == "control.policy"


def test_a_channel_without_an_address_is_a_spec_error(tmp_path):
    specs = copy_specs(tmp_path)

    def drop(doc: dict) -> None:
        ch = doc["channels"]["controlQueues"]
        del ch["address"], ch["bindings"]

    edit_yaml(specs / "asyncapi.yaml", drop)
    with pytest.raises(SpecError, match="controlQueues"):
        c.derive(specs)


# --------------------------------------------------------------------------- fast paths


class _Inner:
    """The ASGI app below a fast path: records what reached it."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, scope, receive, send):
        self.paths.append(scope["path"])
        await send({"type": "http.response.start", "status": 599, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def _call(app, method: str, path: str, *, body: bytes = b"", query: bytes = b"", ctype: bytes = b"application/json") -> int:
    scope = {"type": "http", "method": method, "path": path, "query_string": query, "headers": [(b"content-type", ctype)]}
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"]


def test_fast_path_routes_follow_the_spec(tmp_path):
    specs = copy_specs(tmp_path)

    def edit(doc: dict) -> None:
        rename_path(doc, "/strategies", "/v2/strategies")
        rename_path(doc, "/worlds/{world_id}/decide", "/worlds/{world_id}/decision")
        for p in gateway_op(doc, "decide")["parameters"]:
            if p.get("name") == "as_of":
                p["name"] = "at"

    edit_yaml(specs / "openapi.yaml", edit)
    submit = c.operation("gateway", "submit_strategy", specs)
    decide = c.operation("gateway", "decide", specs)
    assert (submit.method, submit.path, submit.request_schema) == ("POST", "/v2/strategies", "strategy_submission.schema.json")
    assert (decide.path, decide.path_params, decide.query_params) == ("/worlds/{world_id}/decision", ("world_id",), ("at",))
    assert decide.match("/worlds/w-1/decision") == {"world_id": "w-1"} and decide.match("/worlds/w-1/decide") is None

    class Ingest:
        submitted: ClassVar[list[dict]] = []

        async def submit(self, body, subject):
            self.submitted.append(body)
            return {"strategy_id": "s-1", "queue_map": {}}, {"Location": "/v2/strategies/s-1/status"}

    class Auth:
        async def authenticate(self, headers):
            return type("Identity", (), {"subject": "dev"})()

    body = json.dumps({"dag_json": "e30=", "meta": {}, "run_type": "live", "node_ids_crc32": 0}).encode()

    async def run_submit() -> None:
        inner = _Inner()
        ingest = Ingest()
        fast = SubmitFastPath(inner, Auth(), ingest, op=submit)
        assert await _call(fast, "POST", "/v2/strategies", body=body) == 202  # the renamed route is served
        assert await _call(fast, "POST", "/strategies", body=body) == 599  # the old one is not its route any more
        assert inner.paths == ["/strategies"] and len(ingest.submitted) == 1

    class Proxy:
        asked: ClassVar[list[tuple]] = []

        def fast_decide(self, world_id, query, headers):
            self.asked.append((world_id, query))
            return None  # decline: the stack answers

    async def run_decide() -> None:
        inner = _Inner()
        fast = DecideFastPath(inner, Proxy(), op=decide)
        await _call(fast, "GET", "/worlds/w-1/decision", query=b"at=2026-01-01T00:00:00Z")
        await _call(fast, "GET", "/worlds/w-1/decide")
        assert Proxy.asked == [("w-1", b"at=2026-01-01T00:00:00Z")]  # only the spec's route is looked at
        assert inner.paths == ["/worlds/w-1/decision", "/worlds/w-1/decide"]

    asyncio.run(run_submit())
    asyncio.run(run_decide())


def test_a_fast_path_refuses_a_spec_it_cannot_serve_by_the_same_rules(tmp_path):
    specs = copy_specs(tmp_path)

    def edit(doc: dict) -> None:
        decide = gateway_op(doc, "decide")
        del decide["responses"]["304"]  # a cache hit may answer 304: the spec must say so
        gateway_op(doc, "submit_strategy")["responses"]["201"] = gateway_op(doc, "submit_strategy")["responses"].pop("202")

    edit_yaml(specs / "openapi.yaml", edit)
    with pytest.raises(SpecError, match="304"):
        DecideFastPath(_Inner(), object(), op=c.operation("gateway", "decide", specs))
    with pytest.raises(SpecError, match="202"):
        SubmitFastPath(_Inner(), object(), object(), op=c.operation("gateway", "submit_strategy", specs))


# --------------------------------------------------------------------------- proxy rules


def test_proxy_rules_follow_the_spec(tmp_path):
    live = c.proxy_rules()
    assert set(live) == {op_id for _r, _m, op in load_openapi("gateway").operations()
                         if (op_id := op["operationId"]) and op.get("tags") == ["worlds"]}
    assert live["apply"].live_guard == "always" and live["record_observation"].idempotent is False
    specs = copy_specs(tmp_path)

    def edit(doc: dict) -> None:
        gateway_op(doc, "apply")["x-qmtl-proxy"] = {"operation": "apply", "idempotent": False}
        del gateway_op(doc, "get_audit")["x-qmtl-proxy"]

    edit_yaml(specs / "openapi.yaml", edit)
    rules = c.proxy_rules(specs_dir=specs)
    assert (rules["apply"].idempotent, rules["apply"].live_guard, rules["apply"].changes_decisions) == (False, "never", False)
    assert "get_audit" not in rules


@pytest.mark.parametrize("rule, message", [
    ({"operation": "apply", "idempotent": True, "live_guard": "sometimes"}, "live_guard"),
    ({"operation": "apply"}, "idempotent"),
    ({"operation": "apply", "idempotent": True, "retries": 3}, "retries"),
])
def test_a_malformed_proxy_extension_is_a_spec_error(tmp_path, rule, message):
    specs = copy_specs(tmp_path)
    edit_yaml(specs / "openapi.yaml", lambda d: gateway_op(d, "apply").update({"x-qmtl-proxy": rule}))
    with pytest.raises(SpecError, match=f"x-qmtl-proxy.*{message}|{message}.*x-qmtl-proxy"):
        load_openapi("gateway", specs)


def test_a_proxy_rule_must_name_the_same_worldservice_route(tmp_path):
    specs = copy_specs(tmp_path)
    edit_yaml(specs / "openapi.yaml", lambda d: gateway_op(d, "get_audit")["x-qmtl-proxy"].update(operation="get_world"))
    with pytest.raises(SpecError, match="paths must match"):
        load_all(specs)
    specs2 = copy_specs(tmp_path / "2")
    edit_yaml(specs2 / "openapi.yaml", lambda d: gateway_op(d, "get_audit")["x-qmtl-proxy"].update(operation="no_such_op"))
    with pytest.raises(SpecError, match="no_such_op"):
        load_all(specs2)


def test_every_live_guard_rule_of_the_extension_is_implemented():
    """The extension's enum of live-guard rules and LiveGuard.check (WorldsProxy.live_guard) agree."""
    from prometheus_client import CollectorRegistry, Counter

    from qmtl.common.errors import Forbidden
    from qmtl.gateway.worlds import Incoming, LiveGuard

    schema = json.loads((SPECS_DIR / "extensions/x-qmtl-proxy.schema.json").read_text())
    rules = schema["properties"]["live_guard"]["enum"]
    guard = LiveGuard(None, allow_live=False, refusals=Counter("refusals", "", ["operation"], registry=CollectorRegistry()))

    async def allows_live(world_id, identity):
        return True

    guard.world_allows_live = allows_live
    refused = {}
    for rule in rules:
        body = {"active": True, "allow_live": True, "set_default": True}
        try:
            asyncio.run(guard.check("op", rule, "w", body, Incoming({}), None))
            refused[rule] = False
        except Forbidden:
            refused[rule] = True
    assert refused == {r: r != "never" for r in rules}


# --------------------------------------------------------------------------- generated SDK types


def test_sdk_types_are_not_stale():
    from scripts.gen_sdk_types import TARGET, generate

    assert TARGET.read_text(encoding="utf-8") == generate(), "qmtl/sdk/types.py is stale: run python scripts/gen_sdk_types.py"


def test_contract_enums_are_not_stale():
    from scripts.gen_sdk_types import ENUMS_TARGET, generate_enums

    assert ENUMS_TARGET.read_text(encoding="utf-8") == generate_enums(), \
        "qmtl/contracts/enums.py is stale: run python scripts/gen_sdk_types.py"


def test_contract_enums_follow_an_edited_spec(tmp_path):
    from scripts.gen_sdk_types import generate_enums

    specs = copy_specs(tmp_path)
    edit_json(specs / "schemas/decision_envelope.schema.json", lambda d: d["properties"]["effective_mode"]["enum"].append("dry-run"))
    text = generate_enums(specs)
    assert "class Mode(StrEnum):" in text
    assert "    LIVE = 'live'\n    DRY_RUN = 'dry-run'\n" in text
    namespace: dict[str, Any] = {}
    exec(compile(text, "enums.py", "exec"), namespace)  # the generated module is the derived one
    assert [m.value for m in namespace["Mode"]] == [m.value for m in c.derive(specs).Mode]


def test_sdk_types_follow_an_edited_spec(tmp_path):
    from scripts.gen_sdk_types import generate

    specs = copy_specs(tmp_path)
    edit_json(specs / "schemas/activation_envelope.schema.json", lambda d: d["properties"]["side"].update(enum=["long", "short", "flat"]))
    edit_json(specs / "schemas/world.schema.json", lambda d: d["properties"].update(region={"type": "string"}))
    text = generate(specs)
    assert "Side = Literal['long', 'short', 'flat']" in text
    assert "SIDE_VALUES: tuple[Side, ...] = ('long', 'short', 'flat')" in text
    assert "    region: NotRequired[str]\n" in text


# --------------------------------------------------------------------------- the code


def _enum_references() -> list[tuple[str, int, str, str]]:
    names = set(c.ENUM_SOURCES)
    out = []
    for path in code_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in names \
                    and node.attr.isupper():
                out.append((rel(path), node.lineno, node.value.id, node.attr))
    return out


def test_code_names_only_enum_members_the_spec_has(tmp_path):
    refs = _enum_references()
    assert len(refs) > 40  # the scan sees the code's uses (StrategyState.QUEUED, Mode.BACKTEST, ...)
    missing = [r for r in refs if r[3] not in c.ENUMS[r[2]].__members__]
    assert not missing, f"code names enum members the specs do not have: {missing}"
    # a renamed value in the spec is caught by this scan (not at runtime)
    specs = copy_specs(tmp_path)
    edit_json(specs / "schemas/strategy_status.schema.json",
              lambda d: d["properties"]["status"].update(enum=["queued", "processing", "diff_done", "completed", "failed"]))
    renamed = c.derive(specs)
    broken = {f"{e}.{a}" for _f, _l, e, a in refs if a not in renamed.enums[e].__members__}
    assert broken == {"StrategyState.DIFFED"}


def test_every_copy_of_an_enum_in_the_specs_is_the_same():
    """The specs repeat some enums (side, mode, match_mode, topics) in several schemas and in
    OpenAPI parameters; the Python derives each from one place, so the copies must agree."""
    by_property = {"side": "Side", "sides": "Side", "effective_mode": "Mode", "mode": "Mode", "max_mode": "Mode",
                   "match_mode": "MatchMode", "run_type": "RunType", "topic": "StreamTopic", "topics": "StreamTopic"}
    aliases = {"subscribe_request.schema.json": {"queue"}}  # documented aliases (qmtl/gateway/events/tokens.py)
    seen: list[str] = []

    def walk(node: Any, where: str, name: str | None, doc: str) -> None:
        if isinstance(node, dict):
            if "enum" in node and name in by_property:
                want = {m.value for m in c.ENUMS[by_property[name]]}
                assert set(node["enum"]) - aliases.get(doc, set()) == want, f"{where}: {node['enum']} != {sorted(want)}"
                seen.append(where)
            for k, v in node.items():
                child = k if k not in ("items", "schema") else name
                if k == "properties":
                    for pk, pv in v.items():
                        walk(pv, f"{where}/properties/{pk}", pk, doc)
                elif k == "parameters" and isinstance(v, list):
                    for i, p in enumerate(v):
                        walk(p, f"{where}/parameters/{i}", p.get("name") if isinstance(p, dict) else None, doc)
                else:
                    walk(v, f"{where}/{k}", child if k in ("items", "schema") else None, doc)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}/{i}", name, doc)

    for path in sorted((SPECS_DIR / "schemas").glob("*.json")):
        walk(json.loads(path.read_text()), path.name, None, path.name)
    for name in ("openapi.yaml", "worldservice.yaml", "dagmanager.yaml"):
        walk(yaml.safe_load((SPECS_DIR / name).read_text()), name, None, name)
    assert len(seen) >= 20, seen  # the walk reaches the copies


# Literals that name contract values; they must come from qmtl.contracts.constants (or, in
# the SDK, from the generated qmtl.sdk.types). Common words (any, all, live, failed, ...) are
# left to the collection check below.
DISTINCT_ENUMS = ("Mode", "RunType", "StrategyState", "Side", "WorldState", "PolicyStatus")
COMMON_WORDS = {"live", "completed", "failed", "ACTIVE"}

# (file, literal) → why it may stay.
ALLOWED = {
    ("qmtl/gateway/ingest/redisq.py", "processing"): "a Redis list name, not the FSM state",
    ("qmtl/dagmanager/plan.py", "dry-run"): "SIM_RUN_TYPES: legacy run-type aliases the DAG Manager accepts",
    ("qmtl/dagmanager/plan.py", "dryrun"): "SIM_RUN_TYPES: legacy run-type aliases the DAG Manager accepts",
    ("qmtl/sdk/client.py", "dry-run"): "the SDK's default argument",
    ("qmtl/sdk/dag.py", "dry-run"): "the SDK's default argument",
    ("qmtl/sdk/state.py", "ACTIVE"): "SDK-side policy status (the SDK does not load specs)",
}
ALLOWED_SCHEMA_NAMES = {
    "qmtl/contracts/constants.py": "where enums are read from",
    "qmtl/sdk/client.py": "the hand-written SDK client validates answers by schema file (debug mode)",
    "qmtl/gateway/ingest/dag.py": "the DAG schema: the decoded dag_json, which no operation names",
    "qmtl/worldservice/policy.py": "the policy YAML document's schema, which no operation names",
    "qmtl/dagmanager/tagindex.py": "the QueueUpdated payload",
    "qmtl/gateway/events/component.py": "the WebSocket frame schema",
}


def _string_literals(path: Path) -> list[tuple[int, str]]:
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
        if tok.type == tokenize.STRING:
            try:
                value = ast.literal_eval(tok.string)
            except (ValueError, SyntaxError):
                continue  # f-strings
            if isinstance(value, str):
                out.append((tok.start[0], value))
    return out


def test_contract_literals_do_not_reappear_in_the_code():
    distinct = {m.value for e in DISTINCT_ENUMS for m in c.ENUMS[e]} - COMMON_WORDS
    distinct |= set(c.CONTROL_TOPICS)
    found = []
    for path in code_files():
        name = rel(path)
        if name in GENERATED or name == "qmtl/contracts/constants.py":
            continue
        for line, value in _string_literals(path):
            if value in distinct and (name, value) not in ALLOWED:
                found.append(f"{name}:{line}: {value!r}")
            elif value.endswith(".schema.json") and name not in ALLOWED_SCHEMA_NAMES:
                found.append(f"{name}:{line}: {value!r} (take the schema from the operation: qmtl.contracts.constants.operation)")
    assert not found, "contract literals restated in Python:\n" + "\n".join(found)


def test_no_enum_is_restated_as_a_literal_collection():
    """A tuple/list/set of strings that is (two or more values of) a derived enum, e.g.
    ``("activation", "policy", "queues")`` or ``("any", "all")``, restates the spec."""
    enums = {name: {m.value for m in e} for name, e in c.ENUMS.items()}
    allowed = {
        ("qmtl/sdk/client.py", frozenset({"completed", "failed"})): "the SDK's default terminal states to wait for",
        ("qmtl/sdk/stream/subscription.py", frozenset({"activation", "policy"})): "the SDK's world-scoped topics (it loads no specs)",
    }
    found = []
    for path in code_files():
        name = rel(path)
        if name in GENERATED:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 2 \
                    and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
                values = frozenset(e.value for e in node.elts)
                for enum, members in enums.items():
                    if values <= members and (name, values) not in allowed and name != "qmtl/contracts/constants.py":
                        found.append(f"{name}:{node.lineno}: {sorted(values)} ({enum})")
    assert not found, "enums restated as literal collections:\n" + "\n".join(found)
