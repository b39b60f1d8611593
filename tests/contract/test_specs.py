"""Every spec validates; every example in a spec validates against its schema."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from qmtl.contracts import loader
from qmtl.contracts.events import channel_payload_files, event_validators, schema_validator

SCHEMAS = loader.load_schema_files()


def test_schema_files_are_valid_2020_12_with_ids_titles_and_examples():
    titles = set()
    for name, schema in SCHEMAS.items():
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema", name
        assert schema["$id"] == loader.SCHEMA_BASE + name
        assert schema.get("title"), f"{name} has no title"
        assert schema["title"] not in titles, f"duplicate title {schema['title']}"
        titles.add(schema["title"])
        assert schema.get("examples"), f"{name} has no examples"


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_schema_example_validates(name):
    validator = Draft202012Validator(SCHEMAS[name], registry=loader.schema_registry(), format_checker=Draft202012Validator.FORMAT_CHECKER)
    for i, example in enumerate(SCHEMAS[name]["examples"]):
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(example)]
        assert not errors, f"{name} example {i}: {errors}"


def test_normative_envelopes_keep_every_required_field_and_enum():
    reference = Path(__file__).resolve().parents[3] / "shared" / "reference" / "schemas"
    if not reference.is_dir():  # CI has shared/ beside the clone; so does every session
        pytest.fail(f"normative schemas not found at {reference}")
    for path in reference.glob("*.json"):
        ref = json.loads(path.read_text())
        ours = SCHEMAS[path.name]
        assert set(ref["required"]) <= set(ours["required"]), path.name
        for prop, spec in ref["properties"].items():
            assert prop in ours["properties"], f"{path.name}: {prop} dropped"
            if "enum" in spec:
                assert set(spec["enum"]) <= set(ours["properties"][prop].get("enum", [])), f"{path.name}: {prop} enum narrowed"
            if "const" in spec:
                assert ours["properties"][prop].get("const") == spec["const"]


@pytest.mark.parametrize("service", sorted(loader.OPENAPI_FILES))
def test_openapi_spec_validates_and_is_complete(service):
    spec = loader.load_openapi(service)
    assert spec.bundled["openapi"].startswith("3.1")
    for route, method, op in spec.operations():
        where = f"{service} {method.upper()} {route}"
        assert op.get("operationId"), where
        assert op.get("tags"), f"{where}: the first tag names the handler module"
        responses = op["responses"]
        errors = [code for code in responses if code == "default" or code.startswith(("4", "5"))]
        assert errors, f"{where}: no error responses documented"
        for code in errors:
            response = responses[code]
            if "$ref" in response:  # '#/components/responses/X'
                response = spec.bundled["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
            content = response.get("content", {})
            assert "application/problem+json" in content, f"{where} {code}: errors must be problem+json"


@pytest.mark.parametrize("service", sorted(loader.OPENAPI_FILES))
def test_every_deprecated_operation_names_its_deprecation_and_successor(service):
    """The app builder sends ``x-qmtl-deprecation`` as headers on every response of a deprecated
    operation; one without it would be deprecated in the docs only."""
    spec = loader.load_openapi(service)
    for route, method, op in spec.operations():
        if op.get("deprecated"):
            marks = op.get("x-qmtl-deprecation") or {}
            where = f"{service} {method.upper()} {route}"
            assert str(marks.get("deprecation", "")).startswith("@"), f"{where}: RFC 9745 date '@<epoch>'"
            assert 'rel="successor-version"' in str(marks.get("link", "")), f"{where}: Link to the successor"


def _media_examples(doc):
    """(where, schema, example) for every example in an OpenAPI document."""
    for route, item in doc.get("paths", {}).items():
        for method, op in item.items():
            if not isinstance(op, dict):
                continue
            bodies = []
            if "requestBody" in op:
                bodies.append(("request", op["requestBody"]))
            for code, resp in op.get("responses", {}).items():
                bodies.append((code, resp))
            for label, body in bodies:
                for ctype, media in (body.get("content") or {}).items():
                    schema = media.get("schema")
                    if schema is None:
                        continue
                    if "example" in media:
                        yield f"{method.upper()} {route} {label} {ctype}", schema, media["example"]
                    for name, ex in (media.get("examples") or {}).items():
                        if "value" in ex:
                            yield f"{method.upper()} {route} {label} {ctype} {name}", schema, ex["value"]


@pytest.mark.parametrize("service", sorted(loader.OPENAPI_FILES))
def test_every_openapi_example_validates(service):
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    doc = loader.load_openapi(service).bundled
    registry = Registry().with_resource("urn:doc", Resource.from_contents(doc, default_specification=DRAFT202012))
    count = 0
    for where, schema, example in _media_examples(doc):
        validator = Draft202012Validator(_rebase(schema), registry=registry, format_checker=Draft202012Validator.FORMAT_CHECKER)
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(example)]
        assert not errors, f"{service} {where}: {errors}"
        count += 1
    assert count > 0, f"{service}: no examples at all"


def _rebase(node):
    """Point '#/components/...' refs at the registered document."""
    if isinstance(node, dict):
        return {k: ("urn:doc" + v if k == "$ref" and isinstance(v, str) and v.startswith("#/") else _rebase(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_rebase(v) for v in node]
    return node


def test_asyncapi_channels_and_payloads():
    doc = loader.load_asyncapi()
    assert doc["asyncapi"].startswith("3.")
    payloads = channel_payload_files()
    assert payloads["control.activation"] == ["event_activation_updated.schema.json"]
    assert payloads["control.policy"] == ["event_policy_updated.schema.json"]
    assert payloads["control.queues"] == ["event_queue_updated.schema.json"]
    assert payloads["/ws/evt"] == payloads["/ws"] == ["ws_frame.schema.json"]
    for files in payloads.values():
        for f in files:
            assert f in SCHEMAS


def test_event_validators_accept_examples_and_refuse_violations():
    v = event_validators()
    for topic, files in channel_payload_files().items():
        for f in files:
            for example in SCHEMAS[f]["examples"]:
                v.validate(topic, example)
    bad = dict(SCHEMAS["event_activation_updated.schema.json"]["examples"][0], weight=1.5)
    with pytest.raises(ValueError, match="/weight"):
        v.validate("control.activation", bad)
    with pytest.raises(ValueError, match="no channel"):
        v.validate("control.nope", {})
    frame = schema_validator("ws_frame.schema.json")
    ex = dict(SCHEMAS["ws_frame.schema.json"]["examples"][0])
    assert frame.is_valid(ex)
    ex["data"] = dict(ex["data"], side="sideways")
    assert not frame.is_valid(ex)
    assert frame.errors(ex)[0]["pointer"] == "/data/side"


def test_a_broken_spec_is_refused_with_a_clear_message(tmp_path):
    specs = tmp_path / "specs"
    shutil.copytree(loader.SPECS_DIR, specs)
    doc = yaml.safe_load((specs / "worldservice.yaml").read_text())
    first_path = next(iter(doc["paths"].values()))
    first_op = next(v for k, v in first_path.items() if k in ("get", "post", "put", "delete"))
    first_op["responses"] = "not a mapping"
    (specs / "worldservice.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(loader.SpecError, match=r"worldservice\.yaml"):
        loader.load_openapi.__wrapped__("worldservice", specs)
    (specs / "schemas" / "problem.schema.json").write_text("{not json")
    with pytest.raises(loader.SpecError, match=r"problem\.schema\.json: not valid JSON"):
        loader.load_schema_files.__wrapped__(specs / "schemas")
