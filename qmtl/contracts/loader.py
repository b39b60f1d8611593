"""Load the specs in ``specs/``, validate them, and bundle external schema refs.

The specs are the only source of contracts. ``specs/schemas/*.json`` are JSON Schema
2020-12 documents, each with an ``$id`` under :data:`SCHEMA_BASE`; the OpenAPI and
AsyncAPI documents reference them by relative file path (``schemas/x.schema.json``)
and schemas reference each other the same way (``x.schema.json``).

``bundle_openapi`` turns an OpenAPI document with such external refs into a
self-contained one: every referenced schema file becomes
``components/schemas/<Title>`` and every ref is rewritten to point there. That
document is what Connexion routes and validates with, what ``/openapi.json``
serves, and what Schemathesis and client generators read.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012


def find_specs_dir() -> Path:
    """``specs/`` of the checkout when running from one (the source of truth), else the copy an
    installed wheel carries as package data (``qmtl/_specs``, copied there by ``setup.py``)."""
    here = Path(__file__).resolve()
    checkout = here.parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "specs" / "openapi.yaml").is_file():
        return checkout / "specs"
    return here.parents[1] / "_specs"


SPECS_DIR = find_specs_dir()
SCHEMAS_DIR = SPECS_DIR / "schemas"
SCHEMA_BASE = "https://qmtl.dev/schemas/"

OPENAPI_FILES = {
    "gateway": "openapi.yaml",
    "worldservice": "worldservice.yaml",
    "dagmanager": "dagmanager.yaml",
}
ASYNCAPI_FILE = "asyncapi.yaml"


class SpecError(RuntimeError):
    """A spec file is missing, unparsable or invalid. The message says which and where."""


def _load_file(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec file: {exc}") from exc
    try:
        if path.suffix == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise SpecError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc


@cache
def load_schema_files(schemas_dir: Path = SCHEMAS_DIR) -> dict[str, dict]:
    """All schema files by file name, each checked to be a valid 2020-12 schema."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    out: dict[str, dict] = {}
    for path in sorted(schemas_dir.glob("*.json")):
        doc = _load_file(path)
        if not isinstance(doc, dict):
            raise SpecError(f"{path}: a schema must be a JSON object")
        expected_id = SCHEMA_BASE + path.name
        if doc.get("$id") != expected_id:
            raise SpecError(f"{path}: $id must be {expected_id!r}, found {doc.get('$id')!r}")
        try:
            Draft202012Validator.check_schema(doc)
        except SchemaError as exc:
            where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
            raise SpecError(f"{path}: invalid JSON Schema at {where}: {exc.message}") from exc
        out[path.name] = doc
    if not out:
        raise SpecError(f"{schemas_dir}: no schema files found")
    return out


@cache
def schema_registry(schemas_dir: Path = SCHEMAS_DIR) -> Registry:
    """A pre-crawled registry of every schema, for validators that follow ``$ref``."""
    resources = [
        (doc["$id"], Resource.from_contents(doc, default_specification=DRAFT202012))
        for doc in load_schema_files(schemas_dir).values()
    ]
    return Registry().with_resources(resources).crawl()


def schema_uri(file_name: str) -> str:
    return SCHEMA_BASE + file_name


def component_name(file_name: str, schema: dict) -> str:
    """``components/schemas`` name for a schema file: its ``title`` (identifier-safe)."""
    title = schema.get("title") or file_name.split(".")[0]
    name = re.sub(r"[^A-Za-z0-9_]", "", title)
    if not name:
        raise SpecError(f"{file_name}: title {title!r} does not give a component name")
    return name


def _split_ref(ref: str) -> tuple[str, str]:
    file_part, _, fragment = ref.partition("#")
    return file_part, fragment


class _Bundler:
    """Inline external schema files into ``components/schemas`` of one document."""

    def __init__(self, schemas: dict[str, dict], where: str) -> None:
        self.schemas = schemas
        self.where = where
        self.components: dict[str, dict] = {}
        self.names: dict[str, str] = {}

    def name_for(self, file_name: str, context: str) -> str:
        if file_name not in self.schemas:
            raise SpecError(f"{self.where}: {context}: $ref to unknown schema file {file_name!r}")
        if file_name in self.names:
            return self.names[file_name]
        schema = self.schemas[file_name]
        name = component_name(file_name, schema)
        if name in self.components and self.names.get(file_name) != name:
            raise SpecError(f"{self.where}: two schema files map to component {name!r}")
        self.names[file_name] = name
        body = copy.deepcopy(schema)
        body.pop("$id", None)
        body.pop("$schema", None)
        self.components[name] = {}  # reserve (handles cycles)
        self.components[name] = self.rewrite(body, file_name)
        return name

    def rewrite(self, node: Any, current_file: str | None, path: str = "") -> Any:
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if k == "$ref" and isinstance(v, str):
                    out[k] = self.rewrite_ref(v, current_file, path)
                elif k == "example" or (k == "examples" and isinstance(v, list)):  # data, not schema
                    out[k] = v
                else:
                    out[k] = self.rewrite(v, current_file, f"{path}/{k}")
            return out
        if isinstance(node, list):
            return [self.rewrite(v, current_file, f"{path}/{i}") for i, v in enumerate(node)]
        return node

    def rewrite_ref(self, ref: str, current_file: str | None, path: str) -> str:
        file_part, fragment = _split_ref(ref)
        if not file_part:
            if current_file is None:
                return ref  # internal ref of the OpenAPI document itself
            # internal ref inside a schema file: relative to that file
            name = self.name_for(current_file, path)
            return f"#/components/schemas/{name}{fragment}"
        if file_part.startswith(SCHEMA_BASE):
            file_part = file_part[len(SCHEMA_BASE):]
        file_name = Path(file_part).name
        name = self.name_for(file_name, path or "(root)")
        return f"#/components/schemas/{name}{fragment}"


def bundle_openapi(doc: dict, schemas: dict[str, dict], where: str) -> dict:
    """Return a self-contained copy of ``doc`` (see module docstring)."""
    bundler = _Bundler(schemas, where)
    out = bundler.rewrite(copy.deepcopy(doc), None)
    comps = out.setdefault("components", {}).setdefault("schemas", {})
    for name, body in bundler.components.items():
        if name in comps:
            raise SpecError(f"{where}: components/schemas/{name} is defined inline and by a schema file")
        comps[name] = body
    return out


def validate_openapi(doc: dict, where: str) -> None:
    from openapi_spec_validator import validate
    from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

    version = str(doc.get("openapi", ""))
    if not version.startswith("3.1"):
        raise SpecError(f"{where}: expected OpenAPI 3.1, found {version or 'no version'!r}")
    try:
        validate(doc)
    except OpenAPIValidationError as exc:
        path = "/".join(str(p) for p in getattr(exc, "absolute_path", []) or [])
        raise SpecError(f"{where}: invalid OpenAPI document at {path or '(root)'}: {exc.message}") from exc
    except Exception as exc:  # referencing errors and the like
        raise SpecError(f"{where}: invalid OpenAPI document: {exc}") from exc


@dataclass(frozen=True)
class OpenAPISpec:
    service: str
    path: Path
    raw: dict
    bundled: dict

    def operations(self) -> Iterator[tuple[str, str, dict]]:
        for route, item in self.bundled.get("paths", {}).items():
            for method, op in item.items():
                if method in {"get", "put", "post", "delete", "patch", "head", "options"}:
                    yield route, method, op


@cache
def load_openapi(service: str, specs_dir: Path = SPECS_DIR) -> OpenAPISpec:
    """Load, bundle and validate the OpenAPI document of ``service``."""
    try:
        file_name = OPENAPI_FILES[service]
    except KeyError:
        raise SpecError(f"unknown service {service!r}; known: {sorted(OPENAPI_FILES)}") from None
    path = specs_dir / file_name
    raw = _load_file(path)
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: an OpenAPI document must be a mapping")
    bundled = bundle_openapi(raw, load_schema_files(specs_dir / "schemas"), str(path))
    validate_openapi(bundled, str(path))
    check_extensions(bundled, path, specs_dir)
    seen: dict[str, str] = {}
    for route, item in bundled.get("paths", {}).items():
        for method, op in item.items():
            if not isinstance(op, dict) or method not in {"get", "put", "post", "delete", "patch"}:
                continue
            op_id = op.get("operationId")
            if not op_id:
                raise SpecError(f"{path}: {method.upper()} {route} has no operationId")
            if op_id in seen:
                raise SpecError(f"{path}: operationId {op_id!r} used twice ({seen[op_id]} and {method.upper()} {route})")
            seen[op_id] = f"{method.upper()} {route}"
    return OpenAPISpec(service, path, raw, bundled)


EXTENSIONS_DIR = "extensions"  # specs/extensions/<x-name>.schema.json: the shape of an OpenAPI extension


def check_extensions(doc: dict, where: Path, specs_dir: Path = SPECS_DIR) -> None:
    """Every ``x-qmtl-*`` member of an operation that has a schema in ``specs/extensions/`` conforms to it."""
    from jsonschema import Draft202012Validator

    validators: dict[str, Any] = {}
    for route, item in (doc.get("paths") or {}).items():
        for method, op in item.items():
            if not isinstance(op, dict):
                continue
            for key, value in op.items():
                if not key.startswith("x-qmtl-"):
                    continue
                if key not in validators:
                    file = specs_dir / EXTENSIONS_DIR / f"{key}.schema.json"
                    validators[key] = Draft202012Validator(_load_file(file)) if file.exists() else None
                if validators[key] is None:
                    continue
                for err in validators[key].iter_errors(value):
                    at = "/".join(str(p) for p in err.absolute_path)
                    raise SpecError(f"{where}: {method.upper()} {route}: {key}{'/' + at if at else ''}: {err.message}")


def check_proxy(gateway: OpenAPISpec, upstream: OpenAPISpec) -> None:
    """Each ``x-qmtl-proxy`` of the Gateway names an operation of ``upstream`` with the same
    method and path (the Gateway forwards the request's own path)."""
    ops = {op["operationId"]: (method, route) for route, method, op in upstream.operations()}
    for route, method, op in gateway.operations():
        rule = op.get("x-qmtl-proxy")
        if rule is None:
            continue
        target = ops.get(rule["operation"])
        if target is None:
            raise SpecError(f"{gateway.path}: {method.upper()} {route}: x-qmtl-proxy names {rule['operation']!r}, "
                            f"which {upstream.path.name} does not have")
        if target != (method, route):
            raise SpecError(f"{gateway.path}: {method.upper()} {route}: x-qmtl-proxy forwards to {rule['operation']!r}, "
                            f"which is {target[0].upper()} {target[1]} in {upstream.path.name}: the paths must match")


@cache
def load_asyncapi(specs_dir: Path = SPECS_DIR) -> dict:
    path = specs_dir / ASYNCAPI_FILE
    doc = _load_file(path)
    if not isinstance(doc, dict) or not str(doc.get("asyncapi", "")).startswith("3."):
        raise SpecError(f"{path}: expected an AsyncAPI 3.x document")
    for key in ("info", "channels", "operations", "components"):
        if key not in doc:
            raise SpecError(f"{path}: missing top-level {key!r}")
    return doc


@cache
def bundled_asyncapi(specs_dir: Path = SPECS_DIR) -> dict:
    """The AsyncAPI document made self-contained like the OpenAPI ones: every schema file a
    payload references becomes ``components/schemas/<Title>`` and the refs point there (what
    ``/asyncapi.json`` serves and a browser renderer can read without fetching files)."""
    return bundle_openapi(load_asyncapi(specs_dir), load_schema_files(specs_dir / "schemas"),
                          str(specs_dir / ASYNCAPI_FILE))


def load_all(specs_dir: Path = SPECS_DIR) -> dict[str, Any]:
    """Load and validate every spec; raise SpecError naming the first broken one."""
    out: dict[str, Any] = {"schemas": load_schema_files(specs_dir / "schemas")}
    for service in OPENAPI_FILES:
        out[service] = load_openapi(service, specs_dir)
    check_proxy(out["gateway"], out["worldservice"])
    out["asyncapi"] = load_asyncapi(specs_dir)
    return out
