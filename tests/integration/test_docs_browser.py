"""The /docs and /redoc pages in a real browser, with no network beyond the node.

Debian's Chromium (`apt-get install chromium`) runs headless under Playwright, which
launches it by path and never downloads a browser of its own. Every request the page
makes is recorded. Requests to the node's address are let through, every other one is
aborted, and the test fails if any was attempted, so the pages must work offline.
Screenshots go to test-artifacts/ at the repository root.

Without Chromium or Playwright the tests fail with the command that installs it.
CI installs both, so a skip would hide a broken setup.
"""

import os
import re
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

# Playwright must use the system browser. This also keeps a `playwright install`
# run by hand from downloading one into this environment.
os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")

REPO_DIR = Path(__file__).resolve().parents[2]
ARTIFACTS_DIR = REPO_DIR / "test-artifacts"
CHROMIUM_PATH = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]
VIEWPORT = {"width": 1400, "height": 1000}
PAGE_LOAD_TIMEOUT_MS = 30_000
# Time after the route list shows, for late requests such as images and workers.
SETTLE_MS = 1500
# Any absolute http(s) URL in a page's HTML, which the browser could fetch.
EXTERNAL_URL_PATTERN = re.compile(r"https?://", re.IGNORECASE)
# Paths that both pages must show once the document is rendered.
SHOWN_PATHS = ("/data/store/", "/apps/add_app/", "/status/health", "/ws/network/events")


def sync_playwright():
    """Return Playwright's sync API, or fail with the install command."""
    try:
        from playwright.sync_api import sync_playwright as start
    except ImportError as error:
        pytest.fail(
            f"Playwright is not installed ({error}). Install the test extra: "
            "pip install -e '.[test]'"
        )
    return start


def require_chromium() -> str:
    if not CHROMIUM_PATH.exists():
        pytest.fail(
            f"{CHROMIUM_PATH} is missing. Install Debian's browser: apt-get install -y chromium"
        )
    return str(CHROMIUM_PATH)


@dataclass
class RequestLog:
    """The requests a page made, split by whether they went to the node."""

    node_host: str
    to_node: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    def route(self, route) -> None:
        """Let requests to the node through and abort every other one."""
        url = route.request.url
        if urlsplit(url).hostname == self.node_host:
            route.continue_()
        else:
            route.abort()

    def record(self, request) -> None:
        """Record every request event, including ones that never reach the route handler."""
        url = request.url
        if url.startswith(("data:", "blob:")):
            return
        if urlsplit(url).hostname == self.node_host:
            self.to_node.append(url)
        else:
            self.elsewhere.append(url)


def render_page(api_url: str, path: str, screenshot_name: str) -> tuple[RequestLog, str]:
    """Load `path` of the node in Chromium; return its requests and the page text."""
    node_host = urlsplit(api_url).hostname
    log = RequestLog(node_host)
    start_playwright = sync_playwright()
    chromium_path = require_chromium()
    ARTIFACTS_DIR.mkdir(exist_ok=True)

    with start_playwright() as playwright:
        # Chromium's own background requests (updates, sign-in, autofill) do not pass
        # through page.route, so host resolution fails for every host but the node's.
        resolver_rule = f"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE {node_host}"
        browser = playwright.chromium.launch(
            executable_path=chromium_path, args=[*CHROMIUM_ARGS, resolver_rule], headless=True
        )
        try:
            context = browser.new_context(viewport=VIEWPORT, service_workers="block")
            page = context.new_page()
            page.route("**/*", log.route)
            page.on("request", log.record)
            page.on(
                "console",
                lambda message: log.console_errors.append(message.text)
                if message.type == "error"
                else None,
            )

            page.goto(api_url + path, timeout=PAGE_LOAD_TIMEOUT_MS)
            page.get_by_text("/data/store/").first.wait_for(timeout=PAGE_LOAD_TIMEOUT_MS)
            page.wait_for_timeout(SETTLE_MS)
            page.screenshot(path=str(ARTIFACTS_DIR / screenshot_name), full_page=False)
            text = page.locator("body").inner_text()
        finally:
            browser.close()
    return log, text


def page_html(api_url: str, path: str) -> str:
    with urllib.request.urlopen(api_url + path, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/html")
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]
        return response.read().decode("utf-8")


@pytest.mark.parametrize(
    "path, screenshot_name, assets",
    [
        (
            "/docs",
            "docs-swagger-ui.png",
            ("swagger-ui-bundle.js", "swagger-ui.css", "swagger-ui-init.js"),
        ),
        ("/redoc", "docs-redoc.png", ("redoc.standalone.js", "redoc-init.js")),
    ],
)
def test_docs_page_renders_offline(devnet_factory, path, screenshot_name, assets):
    devnet = devnet_factory(1)
    api_url = devnet.nodes[0].api_url

    html = page_html(api_url, path)
    assert EXTERNAL_URL_PATTERN.search(html) is None, html

    log, text = render_page(api_url, path, screenshot_name)

    assert log.elsewhere == [], "requests to other hosts"
    assert api_url + "/openapi.json" in log.to_node
    for asset in assets:
        assert api_url + "/docs/static/" + asset in log.to_node, asset
    for shown_path in SHOWN_PATHS:
        assert shown_path in text, shown_path
    assert log.console_errors == []
    assert (ARTIFACTS_DIR / screenshot_name).stat().st_size > 0
