"""Event validators built from ``specs/asyncapi.yaml`` and ``specs/schemas/``.

The AsyncAPI document says which message each channel carries and which schema file is
its payload; this module reads that and compiles one validator per channel address
(topic). jsonschema-rs does the per-event check on the hot path (~1 µs); only when an
event fails is the pure-Python validator run to say what is wrong and where.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema_rs
from jsonschema import Draft202012Validator

from qmtl.bus.base import InvalidEvent
from qmtl.contracts.connexion31 import schema_errors
from qmtl.contracts.loader import SPECS_DIR, SpecError, load_asyncapi, load_schema_files, schema_registry


def _resolve_local(doc: dict, ref: str) -> Any:
    if not ref.startswith("#/"):
        raise SpecError(f"asyncapi.yaml: expected a local $ref, got {ref!r}")
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def channel_payload_files(specs_dir: Path = SPECS_DIR) -> dict[str, list[str]]:
    """Channel address → schema file names of the payloads of its messages."""
    doc = load_asyncapi(specs_dir)
    out: dict[str, list[str]] = {}
    for name, channel in doc["channels"].items():
        files: list[str] = []
        for msg in (channel.get("messages") or {}).values():
            if "$ref" in msg:
                msg = _resolve_local(doc, msg["$ref"])
            payload = msg.get("payload") or {}
            ref = payload.get("$ref", "")
            if not ref.startswith("schemas/"):
                raise SpecError(f"asyncapi.yaml: channel {name}: payload must $ref a file in schemas/")
            files.append(Path(ref).name)
        out[channel["address"]] = sorted(set(files))
    return out


def _bundle(file_name: str, schemas: Mapping[str, dict]) -> dict:
    """A self-contained copy of a schema: referenced files inlined under ``$defs``."""
    root = json.loads(json.dumps(schemas[file_name]))
    defs: dict[str, dict] = {}

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if k == "$ref" and isinstance(v, str) and not v.startswith("#"):
                    target = Path(v.split("#", 1)[0]).name
                    key = target.split(".")[0]
                    if key not in defs:
                        defs[key] = {}
                        body = json.loads(json.dumps(schemas[target]))
                        body.pop("$id", None)
                        body.pop("$schema", None)
                        defs[key] = walk(body)
                    out[k] = f"#/$defs/{key}"
                else:
                    out[k] = walk(v)
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    root = walk(root)
    if defs:
        root.setdefault("$defs", {}).update(defs)
    return root


class SchemaValidator:
    """Fast check with jsonschema-rs; precise errors from jsonschema when it fails."""

    def __init__(self, file_name: str, schemas: Mapping[str, dict]) -> None:
        self.file_name = file_name
        bundled = _bundle(file_name, schemas)
        self._fast = jsonschema_rs.validator_for(bundled)
        self._slow = Draft202012Validator(schemas[file_name], registry=schema_registry(), format_checker=Draft202012Validator.FORMAT_CHECKER)

    def is_valid(self, instance: Any) -> bool:
        return self._fast.is_valid(instance)

    def errors(self, instance: Any) -> list[dict]:
        return schema_errors(self._slow, instance)


class EventValidators:
    """``validate(topic, event)`` for the bus; raises :class:`InvalidEvent` with details."""

    def __init__(self, specs_dir: Path = SPECS_DIR) -> None:
        schemas = load_schema_files(specs_dir / "schemas")
        self.by_topic: dict[str, list[SchemaValidator]] = {
            topic: [SchemaValidator(f, schemas) for f in files]
            for topic, files in channel_payload_files(specs_dir).items()
        }

    def __call__(self, topic: str, event: Mapping) -> None:
        self.validate(topic, event)

    def validate(self, topic: str, event: Mapping) -> None:
        validators = self.by_topic.get(topic)
        if validators is None:
            raise InvalidEvent(f"no channel {topic!r} in asyncapi.yaml")
        for v in validators:
            if v.is_valid(event):
                return
        errs = validators[0].errors(event)
        where = errs[0]["pointer"] or "/" if errs else "/"
        msg = errs[0]["message"] if errs else "does not match any message of the channel"
        raise InvalidEvent(f"invalid event for {topic}: {msg} at {where}")


@cache
def event_validators() -> EventValidators:
    return EventValidators()


@cache
def schema_validator(file_name: str) -> SchemaValidator:
    return SchemaValidator(file_name, load_schema_files())
