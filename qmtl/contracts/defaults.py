"""Fill in the ``default`` values a JSON Schema declares, driven by the schema itself.

JSON Schema validation never changes an instance; ``default`` is an annotation. Where a
contract says "absent means X" (a TagQueryNode without ``match_mode`` is ``any``), the
value lives in the schema as ``default`` and :func:`defaults_filler` applies it, so no
Python literal restates it.

The schema is compiled once into a small plan holding only the parts that lead to a
``default``: ``properties`` (a missing member gets a deep copy of its subschema's
``default``; present members are descended into), ``items``/``prefixItems``, ``$ref``
(local or to another file in ``specs/schemas/``), ``allOf`` and ``if``/``then``/``else``
(the ``if`` subschema is checked with jsonschema-rs). ``anyOf``/``oneOf`` are not followed:
which branch "applies" is ambiguous there, so a default under them would be a guess.

Apply the filler to an instance that already validated (defaults fill gaps; they do not
repair invalid documents). It mutates in place and costs nothing for subtrees without
defaults (a DAG node costs one ``if`` check).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema_rs

from qmtl.contracts.loader import load_schema_files

__all__ = ["defaults_filler"]

Filler = Callable[[Any], None]
_MISSING = object()


class _Compiler:
    def __init__(self, schemas: Mapping[str, dict]) -> None:
        self.schemas = schemas
        self.memo: dict[tuple[str, str], Any] = {}

    def resolve(self, ref: str, current: str) -> tuple[str, str, Any]:
        file_part, _, fragment = ref.partition("#")
        file_name = Path(file_part).name if file_part else current
        node: Any = self.schemas[file_name]
        for part in [p for p in fragment.split("/") if p]:
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return file_name, fragment, node

    def compile_ref(self, ref: str, current: str) -> Filler | None:
        file_name, fragment, node = self.resolve(ref, current)
        key = (file_name, fragment)
        if key in self.memo:
            found = self.memo[key]
            if found is not _MISSING:
                return found

            def lazy(instance: Any) -> None:  # a cycle still being compiled: look it up when applied
                f = self.memo[key]
                if f is not None:
                    f(instance)

            return lazy
        self.memo[key] = _MISSING
        self.memo[key] = self.compile(node, file_name)
        return self.memo[key]

    def compile(self, schema: Any, current: str) -> Filler | None:
        if not isinstance(schema, Mapping):
            return None
        steps: list[Filler] = []
        if isinstance(schema.get("$ref"), str):
            f = self.compile_ref(schema["$ref"], current)
            if f is not None:
                steps.append(f)
        props = schema.get("properties")
        if isinstance(props, Mapping):
            defaults: list[tuple[str, Any]] = []
            inner: list[tuple[str, Filler]] = []
            for name, sub in props.items():
                if isinstance(sub, Mapping) and "default" in sub:
                    defaults.append((name, sub["default"]))
                f = self.compile(sub, current)
                if f is not None:
                    inner.append((name, f))
            if defaults or inner:
                steps.append(_properties(defaults, inner))
        items = schema.get("items")
        if isinstance(items, Mapping):
            f = self.compile(items, current)
            if f is not None:
                steps.append(_items(f))
        for sub in schema.get("allOf") or ():
            f = self.compile(sub, current)
            if f is not None:
                steps.append(f)
        if "if" in schema and ("then" in schema or "else" in schema):
            then_f = self.compile(schema.get("then"), current)
            else_f = self.compile(schema.get("else"), current)
            if then_f is not None or else_f is not None:
                steps.append(_conditional(self.validator(schema["if"], current), then_f, else_f))
        if not steps:
            return None
        if len(steps) == 1:
            return steps[0]

        def all_steps(instance: Any) -> None:
            for step in steps:
                step(instance)

        return all_steps

    def validator(self, schema: Any, current: str) -> Callable[[Any], bool]:
        if isinstance(schema, bool):
            accepts: bool = schema
            return lambda _inst: accepts
        resolved = self._inline(schema, current)
        return jsonschema_rs.validator_for(resolved).is_valid

    def _inline(self, node: Any, current: str) -> Any:
        """``if`` subschemas are small: inline their ``$ref``s so jsonschema-rs needs no registry."""
        if isinstance(node, Mapping):
            if isinstance(node.get("$ref"), str):
                file_name, _frag, target = self.resolve(node["$ref"], current)
                rest = {k: self._inline(v, current) for k, v in node.items() if k != "$ref"}
                target = {k: v for k, v in self._inline(target, file_name).items() if k not in ("$id", "$schema")}
                return {"allOf": [target, rest]} if rest else target
            return {k: self._inline(v, current) for k, v in node.items()}
        if isinstance(node, list):
            return [self._inline(v, current) for v in node]
        return node


def _properties(defaults: list[tuple[str, Any]], inner: list[tuple[str, Filler]]) -> Filler:
    def fill(instance: Any) -> None:
        if not isinstance(instance, dict):
            return
        for name, value in defaults:
            if name not in instance:
                instance[name] = copy.deepcopy(value)
        for name, f in inner:
            if name in instance:
                f(instance[name])

    return fill


def _items(f: Filler) -> Filler:
    def fill(instance: Any) -> None:
        if isinstance(instance, list):
            for item in instance:
                f(item)

    return fill


def _conditional(test: Callable[[Any], bool], then_f: Filler | None, else_f: Filler | None) -> Filler:
    def fill(instance: Any) -> None:
        branch = then_f if test(instance) else else_f
        if branch is not None:
            branch(instance)

    return fill


def _noop(_instance: Any) -> None:
    return None


@cache
def defaults_filler(file_name: str) -> Filler:
    """A function that fills ``file_name``'s defaults into a (valid) instance, in place."""
    compiler = _Compiler(load_schema_files())
    return compiler.compile_ref(file_name, file_name) or _noop

