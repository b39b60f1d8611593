"""The documentation pages as a person meets them: a real browser (Debian's chromium, driven by
Playwright for Python through ``executable_path``; ``make test`` installs chromium) against a
live ``qmtl up``.

* ``/docs`` of the Gateway, WorldService and DAG Manager render their OpenAPI 3.1 document:
  one operation block per operation of the spec, each showing its operationId, and no render
  or resolver error (Connexion's bundled Swagger UI 4 showed "Unable to render this
  definition" for 3.1).
* "Try it out" on the Gateway's ``GET /worlds``, clicked through the UI, gets a 200.
* ``/asyncapi`` renders every operation, channel address and message of specs/asyncapi.yaml.
* Every request a page makes goes to the service that served it (no CDN: the machines have no
  internet), and no page logs a script error.

A failing page leaves a screenshot in the test's tmp dir (named in the failure message).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Page, sync_playwright

from qmtl.contracts.loader import load_asyncapi, load_openapi
from tests.sdk.live import QmtlUp

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags chromium tries to reach Google's hosts at start.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update", "--disable-dev-shm-usage"]
SERVICES = ("gateway", "worldservice", "dagmanager")
RENDER_ERRORS = re.compile(r"Unable to render this definition|Resolver error|Could not render|Failed to load API definition")


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    qmtl = QmtlUp(tmp_path_factory.mktemp("docs") / "data")
    try:
        qmtl.start()
        yield qmtl
    finally:
        qmtl.stop()


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: `make test` installs Debian's chromium (scripts/ensure-test-tools.sh)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class Watched:
    """A page plus what it did: every request URL and every script error / console error."""

    def __init__(self, page: Page, shots: Path) -> None:
        self.page = page
        self.shots = shots
        self.requests: list[str] = []
        self.errors: list[str] = []
        page.on("request", lambda r: self.requests.append(r.url))
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)

    @contextlib.contextmanager
    def screenshot_on_failure(self, name: str):
        try:
            yield
        except BaseException as exc:
            path = self.shots / f"{name}.png"
            with contextlib.suppress(Exception):
                self.page.screenshot(path=str(path), full_page=True)
            raise AssertionError(f"{exc}\n(screenshot: {path})") from exc

    def assert_offline_and_clean(self, origin: str) -> None:
        foreign = [u for u in self.requests if not u.startswith(origin + "/") and urlsplit(u).scheme != "data"]
        assert not foreign, f"the page reached outside its service: {foreign}"
        assert not self.errors, f"the page logged errors: {self.errors}"


@pytest.fixture
def watched(browser, tmp_path):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        yield lambda: Watched(context.new_page(), tmp_path)
    finally:
        context.close()


def _origin(up: QmtlUp, service: str) -> str:
    return {"gateway": up.url, "worldservice": up.worldservice_url, "dagmanager": up.dagmanager_url}[service]


@pytest.mark.parametrize("service", SERVICES)
def test_docs_renders_every_operation_of_the_openapi_31_document(up, watched, service):
    origin = _origin(up, service)
    spec = load_openapi(service)
    expected = sorted(op["operationId"] for _route, _method, op in spec.operations())
    w = watched()
    with w.screenshot_on_failure(f"docs-{service}"):
        w.page.goto(origin + "/docs")
        w.page.wait_for_selector(".swagger-ui .opblock", timeout=30_000)
        assert w.page.locator(".swagger-ui .info .title").inner_text().startswith(spec.bundled["info"]["title"])
        assert "OAS 3.1" in w.page.locator(".swagger-ui .info").inner_text()
        shown = sorted(w.page.locator(".swagger-ui .opblock .opblock-summary-operation-id").all_inner_texts())
        assert shown == expected, f"operations shown differ from the spec: missing {set(expected) - set(shown)}, extra {set(shown) - set(expected)}"
        body = w.page.locator("body").inner_text()
        assert not RENDER_ERRORS.search(body), body[:2000]
        assert w.page.locator(".swagger-ui .errors-wrapper").count() == 0
        w.assert_offline_and_clean(origin)


def test_try_it_out_on_the_gateway_returns_200(up, watched):
    w = watched()
    page = w.page
    with w.screenshot_on_failure("docs-try-it-out"):
        page.goto(up.url + "/docs")
        block = page.locator("#operations-worlds-list_worlds")
        block.wait_for(timeout=30_000)
        block.locator(".opblock-summary").first.click()
        block.get_by_role("button", name="Try it out").click()
        block.get_by_role("button", name="Execute").click()
        status = block.locator(".live-responses-table .response .response-col_status").first
        status.wait_for(timeout=30_000)
        assert status.inner_text().strip() == "200", block.inner_text()[:2000]
        # the request went to the service that served the page (the served spec's first server is "/")
        url = block.locator(".request-url pre").first.inner_text().strip()
        assert url == up.url + "/worlds", url
        assert '"worlds"' in block.locator(".live-responses-table .response .response-col_description").first.inner_text()
        w.assert_offline_and_clean(up.url)


@pytest.mark.parametrize("service", SERVICES)
def test_asyncapi_page_renders_every_channel_operation_and_message(up, watched, service):
    origin = _origin(up, service)
    doc = load_asyncapi()
    w = watched()
    page = w.page
    with w.screenshot_on_failure(f"asyncapi-{service}"):
        page.goto(origin + "/asyncapi")
        page.wait_for_selector("#introduction", timeout=30_000)
        assert page.locator("#introduction").inner_text().startswith(doc["info"]["title"])
        for op_id, op in doc["operations"].items():
            section = page.locator(f"#operation-{op['action']}-{op_id}")
            assert section.count() == 1, f"operation {op_id} ({op['action']}) is not rendered"
            channel = doc["channels"][op["channel"]["$ref"].rsplit("/", 1)[-1]]
            assert channel["address"] in section.inner_text(), f"operation {op_id} does not show its channel {channel['address']}"
        text = page.locator("body").inner_text()
        for channel in doc["channels"].values():
            assert channel["address"] in text
        for name in doc["components"]["messages"]:
            assert page.locator(f"#message-{name}").count() == 1, f"message {name} is not rendered"
        for name in doc["servers"]:
            assert page.locator(f"#server-{name}").count() == 1, f"server {name} is not rendered"
        assert page.locator("h2", has_text=re.compile(r"^\s*Error\s*$")).count() == 0, text[:2000]
        w.assert_offline_and_clean(origin)
