"""The web dashboard at /ui/ in a real browser, against a real 3-node network.

Debian's Chromium runs headless under Playwright, launched by path, so no browser is
downloaded. The page may reach only the node: host resolution fails for every other
host, every request to another host is aborted, and each test fails if the page
attempted one or logged a script error. Screenshots go to test-artifacts/.

The dev-mode tests share one network and run in file order: the node list, form
validation, a failed deploy, deploy, scale and stop through the page, and last a
killed node. The token and rate limit tests start their own nodes.
"""

import os
import random
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from helpers import FAST_DAEMON_ARGS, TEST_IMAGE, api_get, api_post, wait_for
from voxanode.devnet import Devnet, allocate_free_block

# Playwright must use the system browser, never download one.
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
DESKTOP_VIEWPORT = {"width": 1366, "height": 768}
PHONE_VIEWPORT = {"width": 390, "height": 844}
APP_ARGS = (
    "--apps-reconcile-interval-seconds", "1",
    "--apps-stats-interval-seconds", "2",
    "--apps-sync-interval-seconds", "3",
    "--apps-stop-timeout-seconds", "2",
)
NODE_LABEL = "io.voxanode.node-id"
SETTLE_SECONDS = 30
PAGE_TIMEOUT_MS = 10_000
REQUEST_POLL_MS = 100
APP_RUNNING_TIMEOUT_MS = 45_000
# SWIM needs a probe round, the suspicion timeout and dissemination to call a killed
# node dead.
NODE_DEATH_TIMEOUT_MS = 45_000
COMMAND_TIMEOUT_SECONDS = 60
WRONG_TOKEN = "voxa_" + "A" * 43


def docker(*args: str) -> str:
    completed = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS
    )
    assert completed.returncode == 0, f"docker {' '.join(args)} failed: {completed.stderr.strip()}"
    return completed.stdout


def remove_node_containers(node_ids: list[str]) -> None:
    for node_id in node_ids:
        leftovers = docker("ps", "-aq", "--filter", f"label={NODE_LABEL}={node_id}").split()
        if leftovers:
            docker("rm", "-f", *leftovers)


def offers_apps(node, node_ids: list[str]) -> bool:
    status, body, _ = api_get(node.api_url, "/data/discover_nodes/", capability="app-deployment")
    return status == 200 and {entry["node_id"] for entry in body["nodes"]} >= set(node_ids)


@pytest.fixture(scope="module")
def network(tmp_path_factory, test_image):
    block = allocate_free_block(4, random.Random())
    devnet = Devnet(
        3,
        tmp_path_factory.mktemp("ui-devnet"),
        first_address=block.first_address,
        api_port=block.api_port,
        peer_port=block.peer_port,
        extra_args=[*FAST_DAEMON_ARGS, *APP_ARGS],
    )
    devnet.start()
    node_ids = [node.fetch_node_id() for node in devnet.nodes]
    try:
        settled = wait_for(lambda: all(offers_apps(node, node_ids) for node in devnet.nodes), SETTLE_SECONDS)
        assert settled is True, "the nodes did not all offer app deployment"
        yield devnet
    finally:
        devnet.stop()
        remove_node_containers(node_ids)


@pytest.fixture(scope="module")
def browser():
    """Return Playwright, started once for the module.

    Each test launches its own Chromium, because the host resolver rule names one node.
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        pytest.fail(f"Playwright is not installed ({error}). Install the test extra: pip install -e '.[test]'")
    if not CHROMIUM_PATH.exists():
        pytest.fail(f"{CHROMIUM_PATH} is missing. Install Debian's browser: apt-get install -y chromium")
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        yield playwright


@dataclass
class Dashboard:
    """One open dashboard page, and what it requested and logged."""

    page: object
    node_host: str
    elsewhere: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        assert self.elsewhere == [], "requests to other hosts"
        assert self.errors == [], "script errors"


@pytest.fixture
def open_dashboard(browser):
    """Open /ui (the redirect) of a node in a new Chromium; every browser is closed after."""
    launched = []

    def open_page(
        api_url: str, viewport: dict = DESKTOP_VIEWPORT, color_scheme: str = "light", fake_clock: bool = False
    ) -> Dashboard:
        node_host = urlsplit(api_url).hostname
        # Chromium's own background requests do not pass through page.route, so host
        # resolution fails for every host but the node's.
        resolver_rule = f"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE {node_host}"
        chromium = browser.chromium.launch(
            executable_path=str(CHROMIUM_PATH), args=[*CHROMIUM_ARGS, resolver_rule], headless=True
        )
        launched.append(chromium)
        context = chromium.new_context(viewport=viewport, color_scheme=color_scheme, service_workers="block")
        if fake_clock:
            # Time runs as usual, and page.clock.fast_forward skips ahead for the page's timers.
            context.clock.install()
        page = context.new_page()
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        dashboard = Dashboard(page, node_host)

        def route(request_route):
            if urlsplit(request_route.request.url).hostname == node_host:
                request_route.continue_()
            else:
                dashboard.elsewhere.append(request_route.request.url)
                request_route.abort()

        page.route("**/*", route)
        page.on("pageerror", lambda error: dashboard.errors.append(str(error)))
        page.goto(api_url + "/ui")
        return dashboard

    yield open_page
    for chromium in launched:
        chromium.close()


def expect(locator):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def discovered_nodes(api_url: str) -> dict[str, tuple[str, str]]:
    status, body, _ = api_get(api_url, "/data/discover_nodes/")
    assert status == 200, body
    return {entry["node_id"]: (entry["status"], entry["address"]) for entry in body["nodes"]}


def shown_nodes(page) -> dict[str, tuple[str, str]]:
    """Return node id -> (status, address) as the page's node table shows them."""
    return page.eval_on_selector_all(
        "#nodes-body tr",
        """rows => Object.fromEntries(rows.map(row => [
            row.dataset.nodeId,
            [row.dataset.status, row.querySelector('td[data-label="Address"]').innerText.trim()],
        ]))""",
    )


def shown_instances(page, app_id: str) -> set[tuple[str, str]]:
    """Return (node id, instance id) of the app's instance dots on the network map."""
    pairs = page.eval_on_selector_all(
        f'#network-map .instance[data-app-id="{app_id}"]',
        "dots => dots.map(dot => [dot.closest('g.map-node').dataset.nodeId, dot.dataset.instanceId])",
    )
    return {tuple(pair) for pair in pairs}


def status_instances(api_url: str, app_id: str) -> set[tuple[str, str]]:
    status, body, _ = api_get(api_url, "/apps/get_app_status/", app_id=app_id)
    assert status == 200, body
    return {(instance["node_id"], instance["instance_id"]) for instance in body["instances"]}


def assert_no_null_text(page) -> None:
    text = page.inner_text("body")
    assert "null" not in text
    assert "undefined" not in text


def wait_for_request(page, paths: list[str], path: str, count_before: int) -> bool:
    """Wait until `paths` contains more than `count_before` requests of `path`."""
    for _ in range(PAGE_TIMEOUT_MS // REQUEST_POLL_MS):
        if paths.count(path) > count_before:
            return True
        page.wait_for_timeout(REQUEST_POLL_MS)
    return False


def focused_app_id(page) -> str | None:
    """Return the data-app-id of the apps row that contains the focus, or None."""
    return page.evaluate("document.activeElement.closest('#apps-body tr')?.dataset.appId ?? null")


def fill_deploy_form(page, **values: str) -> None:
    for name in ("name", "image", "replicas", "cpu", "memory", "ports"):
        page.fill(f"#deploy-{name}", values.get(name, ""))
    page.fill("#deploy-env", values.get("env", ""))


def create_token(node, scope: str, name: str) -> str:
    """Create a token with `voxanode token create` against the node's data directory."""
    environ = {key: value for key, value in os.environ.items() if not key.startswith("VOXA_")}
    environ["PYTHONPATH"] = str(REPO_DIR)
    completed = subprocess.run(
        [sys.executable, "-m", "voxanode", "token", "create", "--scope", scope, "--name", name,
         "--data-dir", str(node.data_dir)],
        cwd=node.data_dir,
        env=environ,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.splitlines()[-1]


# --- dev-mode network, in file order -----------------------------------------------------


def test_dashboard_page_and_assets_served(network):
    api_url = network.nodes[0].api_url
    with urllib.request.urlopen(api_url + "/ui/", timeout=10) as response:
        html = response.read().decode("utf-8")
        assert response.headers["Content-Type"].startswith("text/html")
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert "http://" not in html
    assert "https://" not in html
    for asset in ("dashboard.css", "dashboard.js"):
        assert f"/ui/static/{asset}" in html
        with urllib.request.urlopen(api_url + "/ui/static/" + asset, timeout=10) as response:
            assert response.status == 200
            assert response.headers["ETag"]

    status, body, _ = api_get(api_url, "/ui/static/index.html")
    assert status == 404, body
    assert body["error"]["code"] == "RESOURCE_NOT_FOUND"


def test_dashboard_lists_discovered_nodes(network, open_dashboard):
    api_url = network.nodes[0].api_url
    dashboard = open_dashboard(api_url)
    page = dashboard.page

    assert page.url == api_url + "/ui/"
    expect(page.locator("#nodes-body tr")).to_have_count(3)
    expect(page.locator("#feed-state")).to_have_attribute("data-state", "open")
    expect(page.locator("#network-map g.map-node")).to_have_count(3)
    expected = discovered_nodes(api_url)
    assert {node_id: list(entry) for node_id, entry in expected.items()} == shown_nodes(page)
    self_id = network.nodes[0].fetch_node_id()
    expect(page.locator(f'#nodes-body tr[data-node-id="{self_id}"]')).to_contain_text("this node")
    expect(page.locator("#nodes-body [role=meter]")).to_have_count(6)
    # No request needed a token on a --dev node.
    expect(page.locator("#token-button")).to_be_hidden()
    expect(page.locator("#node-summary")).to_contain_text("3 of 3 nodes online")
    dashboard.assert_clean()


@pytest.mark.parametrize(
    "values, field, input_id, label",
    [
        ({"name": "bad-replicas", "replicas": "0"}, "replicas", "deploy-replicas", "Replicas"),
        ({"name": "bad-memory", "replicas": "1", "memory": "lots"}, "resources.memory", "deploy-memory", "Memory"),
        ({"name": "bad-port", "ports": "70000"}, "ports[0].container_port", "deploy-ports", "Ports"),
    ],
)
def test_dashboard_shows_api_validation_message(network, open_dashboard, values, field, input_id, label):
    api_url = network.nodes[1].api_url
    dashboard = open_dashboard(api_url)
    page = dashboard.page
    expect(page.locator("#nodes-body tr")).to_have_count(3)

    # Submitted from the keyboard: Enter in a text field submits the form.
    fill_deploy_form(page, image=TEST_IMAGE, **values)
    page.focus("#deploy-name")
    page.keyboard.press("Enter")

    # The page shows the API's own message for the same body.
    body = {"name": values["name"], "image": TEST_IMAGE}
    if values.get("replicas"):
        body["replicas"] = int(values["replicas"])
    if values.get("memory"):
        body["resources"] = {"memory": values["memory"]}
    if values.get("ports"):
        body["ports"] = [{"container_port": int(values["ports"])}]
    status, answer, _ = api_post(api_url, "/apps/add_app/", body)
    assert status == 400, answer
    assert answer["error"]["details"]["field"] == field
    message = answer["error"]["message"]
    # The message is shown once, under its field, and Deploy has a summary.
    expect(page.locator("#deploy-message")).to_have_text(f"Not deployed: check the {label} field.")
    expect(page.locator(f"#{input_id}")).to_have_attribute("aria-invalid", "true")
    expect(page.locator(f"#{input_id}")).to_be_focused()
    expect(page.locator(f"#{input_id}-error")).to_have_text(message)
    dashboard.assert_clean()


def test_dashboard_stops_failed_deploy(network, open_dashboard):
    api_url = network.nodes[1].api_url
    dashboard = open_dashboard(api_url)
    page = dashboard.page
    expect(page.locator("#nodes-body tr")).to_have_count(3)

    # The node pulls no image, so an image that no node has fails the deploy (422).
    fill_deploy_form(page, name="dash-missing", image="voxanode-test/missing:latest", replicas="1")
    page.click("#deploy-submit")
    expect(page.locator("#deploy-image")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#deploy-image-error")).to_contain_text("could not start on any node")
    expect(page.locator("#deploy-message")).to_contain_text("Not deployed: check the Image field.")
    expect(page.locator("#deploy-message")).not_to_contain_text("could not start")

    # The failed app stays listed: it cannot be scaled, but it can be stopped.
    row = page.locator("#apps-body tr", has_text="dash-missing")
    expect(row).to_have_attribute("data-status", "failed")
    app_id = row.get_attribute("data-app-id")
    expect(row.locator(".scale-button")).to_be_disabled()
    expect(row.locator(".app-status")).to_have_text("failed")
    stop_button = page.get_by_role("button", name="Stop app dash-missing")
    expect(stop_button).to_be_enabled()

    # Stop by keyboard: the focus comes back to the app's row, not to <body>.
    stop_button.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#stop-cancel")).to_be_focused()
    page.keyboard.press("Tab")
    expect(page.locator("#stop-confirm")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#stop-dialog")).to_be_hidden()
    assert focused_app_id(page) == app_id
    expect(row).to_have_attribute("data-status", "stopped", timeout=APP_RUNNING_TIMEOUT_MS)
    expect(row.locator(".stop-button")).to_be_disabled()
    assert focused_app_id(page) == app_id
    expect(row.locator(".app-status")).to_have_text("stopped")
    assert_no_null_text(page)
    dashboard.assert_clean()


def test_dashboard_deploys_scales_and_stops_app(network, open_dashboard):
    api_url = network.nodes[0].api_url
    dashboard = open_dashboard(api_url)
    page = dashboard.page
    expect(page.locator("#nodes-body tr")).to_have_count(3)

    # Deploy through the form.
    fill_deploy_form(
        page, name="dash-web", image=TEST_IMAGE, replicas="2", cpu="0.2", memory="64m",
        ports="8080", env="GREETING=hello",
    )
    page.click("#deploy-submit")
    expect(page.locator("#deploy-message")).to_have_attribute("data-kind", "ok")
    row = page.locator("#apps-body tr", has_text="dash-web")
    expect(row).to_have_count(1)
    app_id = row.get_attribute("data-app-id")
    replicas = row.locator(".app-replicas")
    expect(replicas).to_have_text("2 / 2 / 2", timeout=APP_RUNNING_TIMEOUT_MS)
    expect(row).to_have_attribute("data-status", "running", timeout=APP_RUNNING_TIMEOUT_MS)

    # The map shows each instance on the node that get_app_status names.
    dots = page.locator(f'#network-map .instance[data-app-id="{app_id}"]')
    expect(dots).to_have_count(2)
    assert shown_instances(page, app_id) == status_instances(api_url, app_id)
    expect(page.locator(f'#map-legend li[data-app-id="{app_id}"]')).to_contain_text("dash-web (2)")

    # Each row's buttons are named with the app, and the row is one line at desktop width.
    for name in ("Scale app dash-web", "Stop app dash-web", "Logs of app dash-web"):
        expect(page.get_by_role("button", name=name, exact=True)).to_have_count(1)
    actions = row.locator(".app-actions").bounding_box()
    assert actions["height"] < 60, actions

    # App traffic through the proxy shows in the row's metrics at the next refresh.
    for _ in range(3):
        with urllib.request.urlopen(api_url + "/proxy/dash-web/", timeout=10) as response:
            assert response.status == 200
    status, body, _ = api_get(api_url, "/apps/get_app_status/", app_id=app_id)
    assert status == 200, body
    assert body["metrics"]["total_requests"] == 3, body["metrics"]
    page.click("#refresh-button")
    expect(row.locator(".metrics")).to_contain_text("3 req, avg ")

    # Follow the app's logs.
    page.get_by_role("button", name="Logs of app dash-web").click()
    expect(page.locator("#logs-state")).to_have_text("Following the logs of dash-web.")
    expect(page.get_by_role("button", name="Stop following")).to_be_enabled()

    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS_DIR / "ui-dashboard-desktop.png"), full_page=True)
    page.set_viewport_size(PHONE_VIEWPORT)
    page.emulate_media(color_scheme="dark")
    # At phone width the table rows become cards.
    expect(page.locator("#nodes-body tr").first).to_have_css("display", "block")
    page.screenshot(path=str(ARTIFACTS_DIR / "ui-dashboard-phone.png"), full_page=True)
    page.set_viewport_size(DESKTOP_VIEWPORT)
    page.emulate_media(color_scheme="light")

    # A rejected count goes back to the app's desired count. Then scale to 3.
    row.locator(".scale-input").fill("-1")
    row.locator(".scale-button").click()
    expect(page.locator("#apps-message")).to_contain_text("Scaling dash-web failed: ")
    expect(row.locator(".scale-input")).to_have_value("2")
    row.locator(".scale-input").fill("3")
    row.locator(".scale-button").click()
    expect(page.locator("#apps-message")).to_contain_text("dash-web: ")
    expect(replicas).to_have_text("3 / 3 / 3", timeout=APP_RUNNING_TIMEOUT_MS)
    expect(dots).to_have_count(3)
    assert shown_instances(page, app_id) == status_instances(api_url, app_id)

    # Stop: the confirmation has the focus on Cancel, and Escape or Cancel leave the
    # app running; confirming stops it.
    row.locator(".stop-button").click()
    expect(page.locator("#stop-dialog")).to_be_visible()
    expect(page.locator("#stop-cancel")).to_be_focused()
    page.keyboard.press("Escape")
    expect(page.locator("#stop-dialog")).to_be_hidden()
    expect(row.locator(".stop-button")).to_be_focused()
    row.locator(".stop-button").click()
    page.click("#stop-cancel")
    expect(page.locator("#stop-dialog")).to_be_hidden()
    expect(row.locator(".stop-button")).to_be_focused()
    assert row.get_attribute("data-status") == "running"
    row.locator(".stop-button").click()
    expect(page.locator("#stop-text")).to_contain_text(app_id)
    page.click("#stop-confirm")
    assert focused_app_id(page) == app_id
    expect(row).to_have_attribute("data-status", "stopped", timeout=APP_RUNNING_TIMEOUT_MS)
    expect(page.locator("#apps-message")).to_contain_text("(3 instances)")
    expect(dots).to_have_count(0)
    expect(row.locator(".stop-button")).to_be_disabled()
    assert focused_app_id(page) == app_id
    assert_no_null_text(page)
    status, body, _ = api_get(api_url, "/apps/get_app_status/", app_id=app_id)
    assert status == 200, body
    assert body["status"] == "stopped"
    expect(page.locator("#logs-state")).to_contain_text("closed")
    dashboard.assert_clean()


def test_dashboard_shows_killed_node_offline(network, open_dashboard):
    api_url = network.nodes[0].api_url
    dashboard = open_dashboard(api_url)
    page = dashboard.page
    expect(page.locator('#nodes-body tr[data-status="online"]')).to_have_count(3)
    # A reload would drop this marker.
    page.evaluate("window.reloadMarker = 'same page'")

    killed = network.nodes[2]
    killed_id = killed.fetch_node_id()
    killed.kill()

    node_row = page.locator(f'#nodes-body tr[data-node-id="{killed_id}"]')
    expect(node_row).to_have_attribute("data-status", "offline", timeout=NODE_DEATH_TIMEOUT_MS)
    expect(page.locator(f'#network-map g.map-node[data-node-id="{killed_id}"]')).to_have_attribute(
        "data-status", "offline"
    )
    expect(page.locator('#events-list li[data-event-type="node_left"]').first).to_contain_text(killed_id)
    # Its last reported load is no longer shown.
    expect(node_row.locator("[role=meter]")).to_have_count(0)
    for label in ("CPU", "Memory", "Active apps"):
        expect(node_row.locator(f'td[data-label="{label}"]')).to_have_text("—")
    assert page.evaluate("window.reloadMarker") == "same page"
    assert discovered_nodes(api_url)[killed_id][0] == "offline"
    dashboard.assert_clean()


# --- a node with authentication ------------------------------------------------------------


def test_dashboard_asks_for_token_without_dev(devnet_factory, open_dashboard):
    devnet = devnet_factory(1, extra_args=("--no-dev",))
    node = devnet.nodes[0]
    read_token = create_token(node, "read", "dashboard-reader")
    write_token = create_token(node, "write", "dashboard-writer")
    dashboard = open_dashboard(node.api_url)
    page = dashboard.page

    # The page prompts for a token. A wrong one is rejected and prompted for again.
    dialog = page.locator("#token-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#token-reason")).to_contain_text("needs a token")
    # Commands in the API's messages show as code, not between backticks.
    expect(page.locator("#token-reason code").first).to_contain_text("voxanode token create")
    assert "`" not in page.inner_text("#token-dialog")
    expect(dialog).to_contain_text("--data-dir")
    page.screenshot(path=str(ARTIFACTS_DIR / "ui-dashboard-token.png"), full_page=False)
    page.fill("#token-input", WRONG_TOKEN)
    page.click("#token-form button[type=submit]")
    expect(page.locator("#token-reason")).to_contain_text("rejected the token")

    # A read token shows the node and opens the event feed, but cannot deploy.
    page.fill("#token-input", read_token)
    page.click("#token-form button[type=submit]")
    expect(dialog).to_be_hidden()
    expect(page.locator("#nodes-body tr")).to_have_count(1)
    expect(page.locator("#feed-state")).to_have_attribute("data-state", "open")
    fill_deploy_form(page, name="denied", image=TEST_IMAGE)
    page.click("#deploy-submit")
    expect(page.locator("#deploy-message")).to_contain_text("needs a token of scope write")
    assert "`" not in page.inner_text("#deploy-message")
    expect(page.locator("#token-button")).to_have_text("Forget token")

    # The token is kept for this tab only.
    assert page.evaluate("sessionStorage.getItem('voxanode.dashboard.token')") == read_token
    assert page.evaluate("localStorage.length") == 0
    assert page.context.cookies() == []

    # Forgetting the token prompts for one again. With a write token a deploy reaches
    # validation.
    page.click("#token-button")
    expect(dialog).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    page.fill("#token-input", write_token)
    page.click("#token-form button[type=submit]")
    expect(dialog).to_be_hidden()
    fill_deploy_form(page, name="allowed", image=TEST_IMAGE, replicas="0")
    page.click("#deploy-submit")
    expect(page.locator("#deploy-replicas-error")).not_to_be_empty()
    expect(page.locator("#deploy-message")).to_have_text("Not deployed: check the Replicas field.")
    expect(page.locator("#nodes-body tr")).to_have_count(1)
    dashboard.assert_clean()


def test_dashboard_rate_limit_pauses_one_category(devnet_factory, open_dashboard):
    # The redirect, the page and its two files use the whole budget of the default
    # category, so the app list is rejected. The node list is in the data category,
    # and one deployment an hour leaves none for a second deploy.
    devnet = devnet_factory(
        1, extra_args=("--rate-limit-default", "4/minute", "--rate-limit-deployments", "1/hour")
    )
    node = devnet.nodes[0]
    dashboard = open_dashboard(node.api_url, fake_clock=True)
    page = dashboard.page
    paths = []
    page.on("request", lambda request: paths.append(urlsplit(request.url).path))

    notice = page.locator("#notice")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text("The node's rate limit was reached")
    expect(notice).to_contain_text("Refreshing the app list again in")
    expect(page.locator("#nodes-body tr")).to_have_count(1)
    expect(page.locator("#node-summary")).to_contain_text("1 of 1 node online")
    status, body, _ = api_get(node.api_url, "/apps/list_apps/")
    assert status == 429, body
    assert body["error"]["details"]["category"] == "default"
    retry_after_ms = int(body["error"]["details"]["retry_after_seconds"]) * 1000
    expect(notice).to_contain_text(body["error"]["message"].split(";")[0])

    # The first deploy spends the deployments budget, the second is rejected: Deploy
    # is disabled with the reason, and reads go on.
    fill_deploy_form(page, name="limited", image=TEST_IMAGE, replicas="0")
    page.click("#deploy-submit")
    expect(page.locator("#deploy-message")).to_have_text("Not deployed: check the Replicas field.")
    page.click("#deploy-submit")
    expect(page.locator("#deploy-submit")).to_be_disabled()
    expect(page.locator("#deploy-message")).to_contain_text("Deploying is paused by the node's rate limit")
    expect(page.locator("#deploy-message")).to_contain_text("deployments (POST /apps/add_app/)")
    expect(notice).not_to_contain_text("deployments")

    # The periodic refresh still reads the node list, but not the paused app list.
    apps_requests = paths.count("/apps/list_apps/")
    nodes_requests = paths.count("/data/discover_nodes/")
    page.clock.fast_forward(21_000)
    assert wait_for_request(page, paths, "/data/discover_nodes/", nodes_requests)
    assert paths.count("/apps/list_apps/") == apps_requests
    expect(page.locator("#deploy-submit")).to_be_disabled()

    # After its Retry-After the app list is read again. run_for fires each timer as its
    # time comes. The page's Retry-After may be up to 1 s longer than this later reply's.
    page.clock.run_for(retry_after_ms + 2_000)
    assert wait_for_request(page, paths, "/apps/list_apps/", apps_requests)
    expect(page.locator("#deploy-submit")).to_be_disabled()
    dashboard.assert_clean()
