"""The documentation routes (qmtl/contracts/docs.py) in front of a service app, over ASGI, and the
vendored UI files (qmtl/contracts/docs_assets) against the pinned npm packages in tools/."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from qmtl.contracts.docs import ASSETS_DIR, DocsRoutes
from qmtl.contracts.loader import bundled_asyncapi, load_asyncapi, load_openapi

ROOT = Path(__file__).resolve().parents[2]


async def _inner(scope, receive, send):
    body = json.dumps({"inner": scope["path"]}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def _client(service: str = "gateway", root_path: str = "") -> httpx.AsyncClient:
    app = DocsRoutes(_inner, load_openapi(service))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, root_path=root_path), base_url="http://svc")


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


@pytest.mark.parametrize("service", ["gateway", "worldservice", "dagmanager"])
async def test_openapi_json_and_yaml_are_the_bundled_spec(service):
    bundled = load_openapi(service).bundled
    async with _client(service) as c:
        j = await c.get("/openapi.json")
        y = await c.get("/openapi.yaml")
    assert j.status_code == y.status_code == 200
    assert j.headers["content-type"] == "application/json" and y.headers["content-type"].startswith("application/yaml")
    doc = j.json()
    assert yaml.safe_load(y.text) == doc
    assert doc["servers"][0] == {"url": "/", "description": "The service that serves this document"}
    assert doc["servers"][1:] == bundled["servers"]
    assert {k: v for k, v in doc.items() if k != "servers"} == {k: v for k, v in bundled.items() if k != "servers"}
    refs = list(_refs(doc))
    assert refs and all(r.startswith("#/components/") for r in refs)
    assert j.headers["access-control-allow-origin"] == "*"


async def test_asyncapi_json_and_yaml_are_self_contained_and_complete():
    source = load_asyncapi()
    async with _client() as c:
        j = await c.get("/asyncapi.json")
        y = await c.get("/asyncapi.yaml")
    assert j.status_code == y.status_code == 200
    doc = j.json()
    assert yaml.safe_load(y.text) == doc == json.loads(json.dumps(bundled_asyncapi()))
    assert doc["asyncapi"] == source["asyncapi"]
    assert doc["channels"].keys() == source["channels"].keys() and doc["operations"].keys() == source["operations"].keys()
    assert doc["components"]["messages"].keys() == source["components"]["messages"].keys()
    refs = list(_refs(doc))
    assert all(r.startswith("#/") for r in refs), [r for r in refs if not r.startswith("#/")]
    # every payload schema file became a component the messages point at
    payloads = {m["payload"]["$ref"] for m in doc["components"]["messages"].values()}
    assert payloads == {f"#/components/schemas/{n}" for n in doc["components"]["schemas"]}


async def test_pages_reference_only_local_files_with_a_strict_csp():
    async with _client() as c:
        for path, ui in (("/docs", "swagger-ui-bundle.js"), ("/asyncapi", "asyncapi-standalone.js")):
            page = await c.get(path)
            assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
            assert "QMTL Gateway" in page.text
            urls = re.findall(r'(?:src|href)="([^"]+)"', page.text)
            assert urls and all(u.startswith("/docs/static/") for u in urls), urls
            assert any(ui in u for u in urls)
            csp = page.headers["content-security-policy"]
            assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "http" not in csp
            for url in urls:  # every referenced file is served, cacheable for good (its URL names its hash)
                r = await c.get(url)
                assert r.status_code == 200, url
                assert "immutable" in r.headers["cache-control"]
            assert (await c.get(path + "/")).text == page.text


async def test_etag_head_methods_and_unknown_files():
    async with _client() as c:
        first = await c.get("/openapi.json")
        etag = first.headers["etag"]
        again = await c.get("/openapi.json", headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
        head = await c.head("/docs")
        assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 0
        post = await c.post("/openapi.json", content=b"{}")
        assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD"
        assert post.headers["content-type"] == "application/problem+json" and post.json()["status"] == 405
        for path in ("/docs/static/nope.js", "/docs/static/..%2Fdocs.py", "/docs/static/"):
            missing = await c.get(path)
            assert missing.status_code == 404 and missing.json()["title"] == "Not Found", path
        # everything else reaches the service app
        assert (await c.get("/worlds")).json() == {"inner": "/worlds"}
        assert (await c.get("/docsx")).json() == {"inner": "/docsx"}


async def test_pages_follow_the_root_path():
    async with _client(root_path="/gw") as c:
        page = await c.get("/gw/docs")
        assert page.status_code == 200
        assert 'data-spec-url="/gw/openapi.json"' in page.text
        assert all(u.startswith("/gw/docs/static/") for u in re.findall(r'(?:src|href)="([^"]+)"', page.text))
        doc = (await c.get("/gw/openapi.json")).json()
        assert doc["servers"][0]["url"] == "/gw"  # "try it out" and generated clients reach the mounted service
        assert (await c.get("/gw/docs/static/swagger-ui.css")).status_code == 200


def test_vendored_ui_files_match_the_pinned_npm_packages():
    """docs_assets/ holds exactly what tools/package-lock.json pins (after `npm ci` in tools/,
    which `make test` runs): a changed pin without re-vendoring, or a hand-edited copy, fails."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "vendor_docs_assets.py"), "--check"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((ASSETS_DIR / "manifest.json").read_text())["files"]
    assert manifest["swagger-ui-bundle.js"]["version"].startswith("5.")  # Swagger UI 5 reads OpenAPI 3.1
    lock = json.loads((ROOT / "tools" / "package-lock.json").read_text())["packages"]
    for entry in manifest.values():
        assert lock[f"node_modules/{entry['package']}"]["version"] == entry["version"]
