"""The OpenAPI document of a live node: its routes, its replies, and schemathesis fuzzing.

Each test starts one node with the fast test flags, which include --dev, so no request
needs a token. The fuzz test sends schemathesis cases to every route of /openapi.json
except the websockets: first the coverage cases of each operation, then positive and
negative cases that Hypothesis generates. It checks that no reply is a 5xx and that
every status, header, content type and body matches the document. The app test
deploys the local test image to check the replies that only a running app produces.
Websocket frames are checked against the message schemas with jsonschema.

Deploys never pull: nodes run with the pull policy "never", so a generated image name
that is not present fails with 422 DEPLOYMENT_FAILED.
"""

import asyncio
import gzip
import json
import socket
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import hypothesis
import jsonschema
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis.errors import Unsatisfiable
from openapi_spec_validator import validate as validate_openapi_document
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from event_stream import EventStream
from helpers import api_get
from voxanode.api.app import create_app
from voxanode.api.routes.docs import OPENAPI_BODY_KEY
from voxanode.settings import Settings

NODE_LABEL = "io.voxanode.node-id"
# Generated cases per operation and generation mode (positive, negative), on top of
# the coverage cases. With 150, each route with parameters or a body got 300 to 550
# cases, and the fuzz test took 22 s on a 2-core machine.
MAX_EXAMPLES_PER_MODE = 150
MIN_CASES_PER_OPERATION = 10
FUZZ_REQUEST_TIMEOUT_SECONDS = 30
FAILURE_TEXT_CHARACTERS = 1500
GENERATION_MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
# Small enough that a fuzzed scale request on a real app starts few containers.
MAX_APP_REPLICAS = "3"
TEST_MAX_TTL_SECONDS = 7200
APP_ARGS = (
    "--apps-reconcile-interval-seconds", "1",
    "--apps-stats-interval-seconds", "1",
    "--apps-stop-timeout-seconds", "2",
    "--apps-max-replicas", MAX_APP_REPLICAS,
)
APP_READY_SECONDS = 60
CAPABILITY_SECONDS = 30
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
REPLY_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


# --- helpers ----------------------------------------------------------------------------


def load_schema(api_url: str) -> Any:
    """Load the node's document with schemathesis, which sends no bearer token."""
    schema = schemathesis.openapi.from_url(api_url + "/openapi.json")
    schema.config.generation.update(with_security_parameters=False)
    return schema


def call_and_check(schema: Any, method: str, path: str, **case_fields: Any) -> Any:
    """Send one request built from `case_fields` and check its reply against the document."""
    operation = schema[path][method]
    if "body" in case_fields:
        case_fields.setdefault("media_type", "application/json")
    case = operation.Case(**case_fields)
    response = case.call(timeout=FUZZ_REQUEST_TIMEOUT_SECONDS)
    case.validate_response(response, checks=checks_for(response, REPLY_CHECKS))
    return response


def message_validator(document: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    """Return a validator for the component schema `name` of the document."""
    root = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return jsonschema.Draft202012Validator(root)


def docker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120)


def remove_node_containers(node_id: str | None) -> None:
    """Remove every container that the node made, found by its node id label."""
    if node_id is None:
        return
    listed = docker("ps", "-aq", "--filter", f"label={NODE_LABEL}={node_id}")
    leftovers = listed.stdout.split()
    if leftovers:
        docker("rm", "-f", *leftovers)


def wait_for(condition, timeout_seconds: float, interval_seconds: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_seconds
    last = None
    while time.monotonic() < deadline:
        last = condition()
        if last is True:
            return True
        time.sleep(interval_seconds)
    return last


# --- the document -----------------------------------------------------------------------


def served_routes(app) -> set[tuple[str, str]]:
    """Return (method, path) of the app's public routes, without HEAD and catch-all routes."""
    routes = set()
    for route in app.router.routes():
        path = route.resource.canonical
        if route.method in ("HEAD", "*") or path.startswith("/internal/"):
            continue
        routes.add((route.method.lower(), path))
    return routes


def without_trailing_slash(routes: set[tuple[str, str]]) -> set[tuple[str, str]]:
    return {(method, path.rstrip("/")) for method, path in routes}


def test_openapi_lists_every_public_route(tmp_path):
    node = SimpleNamespace(settings=Settings(data_dir=tmp_path), node_id="node-000000000000")
    app = create_app(node)
    document = json.loads(app[OPENAPI_BODY_KEY])
    documented = {
        (method, path)
        for path, operations in document["paths"].items()
        for method in operations
    }
    served = served_routes(app)

    assert documented - served == set(), "documented but not served"
    # Most routes are served with and without a trailing slash; the document names one.
    assert without_trailing_slash(served) - without_trailing_slash(documented) == set(), (
        "served but not documented"
    )


def test_openapi_document_is_valid_openapi_31(devnet_factory):
    devnet = devnet_factory(1, extra_args=("--max-ttl-seconds", str(TEST_MAX_TTL_SECONDS)))
    status, document, headers = api_get(devnet.nodes[0].api_url, "/openapi.json")

    assert status == 200, document
    assert headers["Content-Type"].startswith("application/json")
    assert document["openapi"] == "3.1.0"
    validate_openapi_document(document)

    # The limits that come from the settings are the running node's.
    store_body = document["components"]["schemas"]["StoreBody"]["properties"]
    assert store_body["ttl"]["maximum"] == TEST_MAX_TTL_SECONDS

    # Only the health check is open without a token.
    health = document["paths"]["/status/health"]["get"]
    assert health["security"] == []
    assert document["security"] == [{"bearerAuth": []}]
    assert "security" not in document["paths"]["/data/store/"]["post"]

    # The websockets are GET operations that reply with 101.
    for path in ("/ws/network/events", "/ws/apps/{app_id}/logs"):
        assert "101" in document["paths"][path]["get"]["responses"], path


# --- fuzzing ----------------------------------------------------------------------------


@dataclass
class FuzzReport:
    """The cases sent to one operation, their statuses, and the distinct failures."""

    label: str
    cases: int = 0
    seconds: float = 0.0
    statuses: Counter = field(default_factory=Counter)
    failures: dict[str, int] = field(default_factory=dict)

    def check(self, case: Any) -> None:
        """Send `case`, count its status, and record a failed check instead of raising."""
        self.cases += 1
        response = case.call(timeout=FUZZ_REQUEST_TIMEOUT_SECONDS)
        self.statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=checks_for(response, CHECKS))
        except (AssertionError, BaseExceptionGroup) as failure:
            # schemathesis's text names the check, the reply and a curl command.
            text = f"{type(failure).__name__}: {str(failure).strip()[:FAILURE_TEXT_CHARACTERS]}"
            self.failures[text] = self.failures.get(text, 0) + 1


def checks_for(response: Any, checks: list) -> list:
    """Return the `checks` that apply to one reply.

    A deployment that no node has room for is 503 DEPLOYMENT_FAILED by design (the
    README's placement rule): the network, not the server, lacks capacity. That one
    reply is still checked against the document, but not as a server error.
    """
    if response.status_code == 503:
        try:
            code = response.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
        if code == "DEPLOYMENT_FAILED" and "does not fit" in response.text:
            return [check for check in checks if check is not not_a_server_error]
    return checks


def fuzz_operation(schema: Any, operation: Any) -> FuzzReport:
    """Send the coverage cases, then generated positive and negative cases."""
    report = FuzzReport(operation.label)
    started = time.monotonic()

    coverage_config = schema.config.generation_for(operation=operation, phase="coverage")
    for case in schema.iter_coverage_cases(
        operation, generation_modes=GENERATION_MODES, generation_config=coverage_config
    ):
        report.check(case)

    for mode in GENERATION_MODES:

        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        @hypothesis.settings(
            max_examples=MAX_EXAMPLES_PER_MODE,
            derandomize=True,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def send_generated(case):
            report.check(case)

        try:
            send_generated()
        except Unsatisfiable:
            # An operation without parameters or body has no invalid input to send.
            if mode is not GenerationMode.NEGATIVE:
                raise

    report.seconds = time.monotonic() - started
    return report


def test_api_conforms_to_openapi_under_fuzzing(devnet_factory):
    devnet = devnet_factory(1, extra_args=("--apps-max-replicas", MAX_APP_REPLICAS))
    node = devnet.nodes[0]
    node_id = node.fetch_node_id()
    schema = load_schema(node.api_url)
    reports = []
    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            # Websockets are checked in test_app_replies_conform_to_openapi.
            if operation.path.startswith("/ws/"):
                continue
            reports.append(fuzz_operation(schema, operation))
    finally:
        remove_node_containers(node_id)

    for report in reports:
        statuses = ", ".join(f"{status}: {count}" for status, count in sorted(report.statuses.items()))
        print(f"{report.label}: {report.cases} cases in {report.seconds:.1f} s ({statuses})")

    fuzzed = {report.label for report in reports}
    assert "POST /data/store/" in fuzzed
    assert "POST /apps/add_app/" in fuzzed
    few = {report.label: report.cases for report in reports if report.cases < MIN_CASES_PER_OPERATION}
    assert few == {}, "operations that got too few cases"
    failures = {
        report.label: report.failures for report in reports if report.failures
    }
    assert failures == {}, json.dumps(failures, indent=1)


# --- replies that need state ------------------------------------------------------------


def offers_apps(api_url: str, node_id: str) -> bool:
    status, body, _ = api_get(api_url, "/data/discover_nodes/", capability="app-deployment")
    return status == 200 and node_id in {entry["node_id"] for entry in body["nodes"]}


async def read_frames(url: str, limit: int, timeout_seconds: float) -> list[str]:
    """Return the text frames of a websocket until it closes or `limit` arrived."""
    frames: list[str] = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url) as websocket:
            while len(frames) < limit:
                message = await asyncio.wait_for(websocket.receive(), timeout_seconds)
                if message.type != aiohttp.WSMsgType.TEXT:
                    break
                frames.append(message.data)
    return frames


def test_app_replies_conform_to_openapi(devnet_factory, test_image):
    devnet = devnet_factory(1, extra_args=APP_ARGS)
    node = devnet.nodes[0]
    node_id = node.fetch_node_id()
    schema = load_schema(node.api_url)
    document = requests.get(node.api_url + "/openapi.json", timeout=10).json()
    event_validator = message_validator(document, "NetworkEvent")
    log_validator = message_validator(document, "LogMessage")
    assert wait_for(lambda: offers_apps(node.api_url, node_id), CAPABILITY_SECONDS) is True

    try:
        with EventStream(node.api_url) as events:
            deployed = call_and_check(
                schema,
                "POST",
                "/apps/add_app/",
                body={
                    "name": "openapi-web",
                    "image": test_image,
                    "replicas": 2,
                    "ports": [{"container_port": 8080}],
                    "health_check": {"type": "http", "path": "/"},
                    "resources": {"memory": "64m", "cpu": 0.25},
                },
            )
            assert deployed.status_code == 200, deployed.text
            app_id = deployed.json()["app_id"]

            def running():
                reply = call_and_check(schema, "GET", "/apps/get_app_status/", query={"app_id": app_id})
                body = reply.json()
                return True if body["replicas"]["healthy"] == 2 else body

            assert wait_for(running, APP_READY_SECONDS) is True
            assert events.wait_for("app_deployed", APP_READY_SECONDS, app_id=app_id), events.events
            received = list(events.events)

        # Each instance with its ports, health and resource use.
        status_reply = call_and_check(schema, "GET", "/apps/get_app_status/", query={"app_id": app_id})
        instances = status_reply.json()["instances"]
        assert len(instances) == 2
        assert all(instance["ports"] for instance in instances), instances

        listed = call_and_check(schema, "GET", "/apps/list_apps/", query={"status": "running"})
        assert [entry["app_id"] for entry in listed.json()["applications"]] == [app_id]

        conflict = call_and_check(
            schema, "POST", "/apps/add_app/", body={"name": "openapi-web", "image": test_image}
        )
        assert conflict.status_code == 409, conflict.text

        scaled = call_and_check(
            schema, "POST", "/apps/add_scale_app/", body={"app_id": app_id, "replicas": 1}
        )
        assert scaled.status_code == 200, scaled.text

        log_url = node.api_url.replace("http://", "ws://") + f"/ws/apps/{app_id}/logs?tail=5&follow=false"
        frames = asyncio.run(read_frames(log_url, limit=50, timeout_seconds=20))
        assert frames, "the logs websocket sent no line"
        for frame in frames:
            errors = [error.message for error in log_validator.iter_errors(json.loads(frame))]
            assert errors == [], frame

        assert received, "the events websocket sent no event"
        for event in received:
            errors = [error.message for error in event_validator.iter_errors(event)]
            assert errors == [], event

        # A plain GET of a websocket route is the documented 400 envelope.
        for path, path_parameters in (
            ("/ws/network/events", None),
            ("/ws/apps/{app_id}/logs", {"app_id": app_id}),
        ):
            plain = call_and_check(schema, "GET", path, path_parameters=path_parameters)
            assert plain.status_code == 400, plain.text

        stopped = call_and_check(
            schema, "POST", "/apps/add_stop_app/", body={"app_id": app_id, "force": True}
        )
        assert stopped.status_code == 200, stopped.text
        again = call_and_check(schema, "POST", "/apps/add_stop_app/", body={"app_id": app_id})
        assert again.status_code == 409, again.text

        # A stored value, read back, and a deployment that no node has room for.
        stored = call_and_check(
            schema, "POST", "/data/store/", body={"key": "openapi", "value": {"a": [1, None]}}
        )
        assert stored.json()["warnings"], "one node cannot hold 3 replicas"
        read_back = call_and_check(schema, "GET", "/data/retrieve/", query={"key": "openapi"})
        assert read_back.json()["value"] == {"a": [1, None]}
        too_big = call_and_check(
            schema, "POST", "/apps/add_app/", body={"name": "too-big", "image": test_image, "resources": {"cpu": 256}}
        )
        assert too_big.status_code == 503, too_big.text
    finally:
        remove_node_containers(node_id)


# --- request bodies that cannot be read -------------------------------------------------

POST_PATHS = ("/data/store/", "/apps/add_app/", "/apps/add_stop_app/", "/apps/add_scale_app/")


def send_truncated_body(api_url: str, path: str) -> None:
    """Send a POST whose Content-Length promises more bytes than arrive, then close."""
    address = urlsplit(api_url)
    with socket.create_connection((address.hostname, address.port), timeout=5) as connection:
        connection.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {address.hostname}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"key\"".encode()
        )
        connection.shutdown(socket.SHUT_WR)
        connection.settimeout(5)
        while connection.recv(4096):
            pass


def test_unreadable_bodies_are_client_errors(devnet_factory):
    devnet = devnet_factory(1)
    node = devnet.nodes[0]
    schema = load_schema(node.api_url)

    for path in POST_PATHS:
        operation = schema[path]["POST"]
        case = operation.Case(media_type="application/json", body={})
        for encoding, body in (("gzip", b"not gzip data"), ("deflate", b"not deflate data")):
            response = requests.post(
                node.api_url + path,
                data=body,
                headers={"Content-Type": "application/json", "Content-Encoding": encoding},
                timeout=10,
            )
            assert response.status_code == 400, (path, encoding, response.text)
            assert response.json()["error"]["details"]["field"] == "body"
            case.validate_response(response, checks=REPLY_CHECKS)

        # A body that decodes is read as usual.
        valid = requests.post(
            node.api_url + path,
            data=gzip.compress(b"[]"),
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
            timeout=10,
        )
        assert valid.status_code == 400, valid.text
        assert "must be a JSON object" in valid.json()["error"]["message"]

        send_truncated_body(node.api_url, path)

    log_text = node.log_path.read_text(encoding="utf-8", errors="replace")
    assert "unhandled error" not in log_text
