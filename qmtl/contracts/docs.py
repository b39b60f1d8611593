"""The contract as a service serves it to people and tools: documents and documentation pages.

Every service (Gateway, WorldService, DAG Manager) answers, in front of its Connexion app:

* ``GET /openapi.json`` and ``/openapi.yaml`` — its bundled OpenAPI 3.1 document
  (:attr:`OpenAPISpec.bundled`: shared schemas under ``components/schemas``, referenced by
  ``$ref``, never inlined), with one server entry prepended: ``{"url": "/"}`` (or the ASGI
  ``root_path`` the service is mounted under), so Swagger UI's "try it out" and generated
  clients reach the service that served it; the spec's own ``servers`` follow.
* ``GET /asyncapi.json`` and ``/asyncapi.yaml`` — the AsyncAPI 3.0 document of the ControlBus
  and the event stream, bundled the same way (:func:`bundled_asyncapi`).
* ``GET /docs`` — Swagger UI 5 (reads OpenAPI 3.1) on ``/openapi.json``, "try it out" included.
* ``GET /asyncapi`` — the AsyncAPI document rendered by AsyncAPI's React component (standalone
  browser bundle): every channel, operation and message.
* ``GET /docs/static/<file>`` — the UIs' files, vendored from pinned npm packages into
  ``docs_assets/`` (see ``scripts/vendor_docs_assets.py``): nothing is fetched from a CDN.

These routes are not in the OpenAPI documents, as Connexion's own ``/docs`` and
``/openapi.json`` never were: they serve the contract rather than belong to it, a client
generated from the spec must not grow ``get_docs`` methods, and Schemathesis must not fuzz
HTML pages. Their behaviour is tested in tests/e2e/test_docs_browser.py and
tests/unit/test_docs_routes.py instead. Connexion's own spec and Swagger UI 4 routes are
switched off through its options (``serve_spec=False, swagger_ui=False``).

Responses carry an ``ETag`` (``If-None-Match`` → 304); pages carry a Content-Security-Policy
that allows only this origin, so a page that tried to reach a CDN would fail visibly.
"""

from __future__ import annotations

import hashlib
import html
import json
import mimetypes
import typing as t
from functools import cache
from pathlib import Path

import yaml
from starlette.types import ASGIApp, Receive, Scope, Send

from qmtl.common.http import if_none_match
from qmtl.contracts.loader import OpenAPISpec, bundled_asyncapi

ASSETS_DIR = Path(__file__).resolve().parent / "docs_assets"
DOCS_PATH = "/docs"
ASYNCAPI_PATH = "/asyncapi"
STATIC_PREFIX = "/docs/static/"
SERVED_SERVER = {"url": "/", "description": "The service that serves this document"}

# The AsyncAPI parser (ajv) compiles schemas with new Function(): that page needs 'unsafe-eval'.
_CSP = ("default-src 'none'; script-src 'self'{eval}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "font-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

# One page per UI: its stylesheet, its vendored bundle, then our initializer (a file, so the CSP
# can forbid inline scripts), which reads the document URL from the root element.
_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} — {kind} reference</title>
<link rel="icon" type="image/png" href="{icon}">
<link rel="stylesheet" href="{css}">
</head>
<body>
<div id="{root_id}" data-spec-url="{spec_url}"></div>
<script src="{bundle}"></script>
<script src="{init}"></script>
</body>
</html>
"""
_UIS = {  # page path -> (what it documents, root element id, stylesheet, bundle, initializer, document path)
    DOCS_PATH: ("API", "swagger-ui", "swagger-ui.css", "swagger-ui-bundle.js", "qmtl-swagger-init.js", "/openapi.json"),
    ASYNCAPI_PATH: ("event", "asyncapi", "asyncapi.css", "asyncapi-standalone.js", "qmtl-asyncapi-init.js", "/asyncapi.json"),
}


class _Body(t.NamedTuple):
    body: bytes
    content_type: str
    etag: str
    cache: str
    extra: tuple[tuple[bytes, bytes], ...] = ()


def _body(body: bytes, content_type: str, cache: str = "no-cache", extra: tuple[tuple[bytes, bytes], ...] = ()) -> _Body:
    return _Body(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"', cache, extra)


@cache
def _asset_names() -> frozenset[str]:
    return frozenset(p.name for p in ASSETS_DIR.iterdir() if p.is_file()) if ASSETS_DIR.is_dir() else frozenset()


def _asset(name: str) -> _Body | None:
    return _load_asset(name) if name in _asset_names() else None  # a request's name never grows the cache


@cache
def _load_asset(name: str) -> _Body:
    ctype = mimetypes.guess_type(name)[0] or "text/plain"
    if ctype.startswith("text/") or ctype.endswith("javascript"):
        ctype += "; charset=utf-8"
    # Pages reference assets with ?v=<hash>: a changed file is a new URL, so caching forever is safe.
    return _body((ASSETS_DIR / name).read_bytes(), ctype, "public, max-age=31536000, immutable")


def _version(name: str) -> str:
    asset = _asset(name)
    if asset is None:
        raise RuntimeError(f"{ASSETS_DIR / name} is missing: the package was built without its docs assets "
                           "(run scripts/vendor_docs_assets.py)")
    return asset.etag.strip('"')[:12]


def _served_openapi(spec: OpenAPISpec, root: str = "") -> dict:
    """The bundled spec with the serving service first among ``servers`` (``root`` = the ASGI root_path)."""
    here = {**SERVED_SERVER, "url": root or "/"}
    doc = dict(spec.bundled)
    doc["servers"] = [here, *spec.bundled.get("servers", [])]
    return doc


def _yaml(doc: dict) -> bytes:
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=120).encode()


def _json(doc: dict) -> bytes:
    return json.dumps(doc, ensure_ascii=False, indent=1).encode()


class DocsRoutes:
    """ASGI layer: the documentation routes above; every other request goes to ``app``."""

    METHODS = ("GET", "HEAD")
    CORS = ((b"access-control-allow-origin", b"*"),)  # documents are public: tools on other origins read them

    def __init__(self, app: ASGIApp, spec: OpenAPISpec) -> None:
        self.app = app
        self.spec = spec
        self.title = str(spec.bundled.get("info", {}).get("title", spec.service))
        asyncapi = bundled_asyncapi()
        self.asyncapi = {
            "/asyncapi.json": _body(_json(asyncapi), "application/json", extra=self.CORS),
            "/asyncapi.yaml": _body(_yaml(asyncapi), "application/yaml; charset=utf-8", extra=self.CORS),
        }
        self.versions = {name: _version(name) for ui in _UIS.values() for name in ui[2:5]}
        self.versions["favicon-32x32.png"] = _version("favicon-32x32.png")
        self._sites: dict[str, dict[str, _Body]] = {}
        self._site("")  # built at startup; another root_path (from the server's config) on first use

    def _site(self, root: str) -> dict[str, _Body]:
        """Documents and pages as served under ``root``: their links and the spec's own server."""
        site = self._sites.get(root)
        if site is not None:
            return site
        openapi = _served_openapi(self.spec, root)
        site = {
            "/openapi.json": _body(_json(openapi), "application/json", extra=self.CORS),
            "/openapi.yaml": _body(_yaml(openapi), "application/yaml; charset=utf-8", extra=self.CORS),
            **self.asyncapi,
        }

        def url(name: str) -> str:
            return html.escape(f"{root}{STATIC_PREFIX}{name}?v={self.versions[name]}")

        for page, (kind, root_id, css, bundle, init, document) in _UIS.items():
            text = _PAGE.format(title=html.escape(self.title), kind=kind, root_id=root_id, icon=url("favicon-32x32.png"),
                                css=url(css), bundle=url(bundle), init=url(init), spec_url=html.escape(root + document))
            csp = _CSP.format(eval=" 'unsafe-eval'" if page == ASYNCAPI_PATH else "").encode()
            site[page] = site[page + "/"] = _body(text.encode(), "text/html; charset=utf-8", extra=(
                (b"content-security-policy", csp), (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")))
        if len(self._sites) < 8:  # root_path comes from the server's config, not from callers; bound it anyway
            self._sites[root] = site
        return site

    def _lookup(self, path: str, root: str) -> _Body | None:
        if path.startswith(STATIC_PREFIX):
            return _asset(path[len(STATIC_PREFIX):])
        return self._site(root).get(path)

    def _ours(self, path: str) -> bool:
        return path in self._sites[""] or path.startswith(STATIC_PREFIX)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        root = scope.get("root_path", "") or ""
        path = scope["path"]
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if not self._ours(path):
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        if method not in self.METHODS:
            await _problem(send, 405, "Method Not Allowed", f"{path} answers GET and HEAD only, not {method}",
                           ((b"allow", b"GET, HEAD"),))
            return
        found = self._lookup(path, root)
        if found is None:
            await _problem(send, 404, "Not Found", f"{path}: no such documentation file")
            return
        headers = [(b"etag", found.etag.encode()), (b"cache-control", found.cache.encode()), *found.extra]
        if if_none_match(_header(scope, b"if-none-match"), found.etag):
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        headers += [(b"content-type", found.content_type.encode()), (b"content-length", str(len(found.body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else found.body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


async def _problem(send: Send, status: int, title: str, detail: str, extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    from qmtl.common import correlation

    doc = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    cid = correlation.get()
    if cid:
        doc["correlation_id"] = cid
    body = json.dumps(doc).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})


def mount(app: ASGIApp, spec: OpenAPISpec) -> DocsRoutes:
    """``app`` behind the documentation routes of ``spec``'s service."""
    return DocsRoutes(app, spec)
