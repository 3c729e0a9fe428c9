"""AppSpec validation of deploy bodies: defaults, field errors, strictness, round trips."""

import json
import math

import msgspec
import pytest

from voxanode.api.errors import ApiError
from voxanode.apps.spec import (
    MAX_COMMAND_ARGUMENT_BYTES,
    MAX_MEMORY_BYTES,
    MIN_MEMORY_BYTES,
    AppBody,
    AppSpec,
    Environment,
    HealthCheck,
    PortSpec,
    SpecLimits,
    check_scale_replicas,
    image_reference_issue,
    image_registry,
    parse_app_spec,
    parse_cpu,
    parse_memory,
)

MIB = 1024**2
GIB = 1024**3
HEX_64 = "0123456789abcdef" * 4

LIMITS = SpecLimits(
    max_replicas=10,
    allowed_capabilities=frozenset({"NET_BIND_SERVICE", "NET_ADMIN"}),
    max_environment_entries=4,
    max_environment_value_bytes=64,
)
BASE_BODY = {"name": "web", "image": "nginx:1.27"}
CANONICAL_KEY_ORDER = [
    "name",
    "image",
    "replicas",
    "resources",
    "environment",
    "ports",
    "health_check",
    "restart",
    "command",
    "capabilities",
    "ingress",
]


def body(**fields):
    return {**BASE_BODY, **fields}


def tcp_check(**fields):
    """Return a body with port 80 and a tcp health check with `fields`."""
    return body(ports=[{"container_port": 80}], health_check={"type": "tcp", **fields})


def http_check(**fields):
    """Return a body with port 80 and an http health check with `fields`."""
    return body(ports=[{"container_port": 80}], health_check={"type": "http", **fields})


def rejection(data, limits=LIMITS) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse_app_spec(data, limits)
    return caught.value


VALID_BODIES = {
    "minimal": BASE_BODY,
    "reference example": {
        "name": "my-app",
        "image": "nginx:latest",
        "replicas": 2,
        "resources": {"memory": "512m", "cpu": "0.5"},
        "environment": {"NODE_ENV": "production"},
        "ports": [{"container_port": 80, "protocol": "tcp"}],
    },
    "every field": body(
        replicas=10,
        resources={"memory": 1536 * MIB, "cpu": 2},
        environment={"B": "2", "A": "", "_X1": "é ü"},
        ports=[
            {"container_port": 53, "protocol": "udp"},
            {"container_port": 53},
            {"container_port": 8080},
        ],
        health_check={
            "type": "http",
            "path": "/healthz?full=1",
            "port": 8080,
            "interval_seconds": 10,
            "timeout_seconds": 0.5,
            "retries": 5,
            "start_period_seconds": 30,
        },
        restart="on-failure",
        command=["/bin/server", "--port", "8080", ""],
        capabilities=["cap_net_admin", "NET_BIND_SERVICE"],
    ),
    "tcp health check": body(
        ports=[{"container_port": 5432}],
        health_check={"type": "tcp", "port": 5432},
        restart="never",
    ),
    "only memory": body(resources={"memory": "1.5g"}),
    "only cpu": body(resources={"cpu": 0.125}),
    "empty collections": body(resources={}, environment={}, ports=[], capabilities=[]),
    "registry image with digest": body(
        image=f"registry.example.com:5000/team/app:v1.2@sha256:{HEX_64}"
    ),
    "image id": body(image=f"sha256:{HEX_64}"),
}


@pytest.mark.parametrize("data", VALID_BODIES.values(), ids=VALID_BODIES.keys())
def test_spec_round_trips(data):
    spec = parse_app_spec(data, LIMITS)
    canonical = spec.to_dict()

    assert AppSpec.from_dict(canonical) == spec
    assert parse_app_spec(canonical, LIMITS) == spec
    assert json.loads(json.dumps(canonical)) == canonical
    assert AppSpec.from_dict(json.loads(json.dumps(canonical))) == spec
    order = [key for key in CANONICAL_KEY_ORDER if key in canonical]
    assert list(canonical) == order
    assert spec.to_dict() == canonical


def test_spec_minimal_defaults():
    spec = parse_app_spec(BASE_BODY, LIMITS)

    assert spec.name == "web"
    assert spec.image == "nginx:1.27"
    assert spec.replicas == 1
    assert spec.memory_bytes is None
    assert spec.cpu is None
    assert dict(spec.environment) == {}
    assert spec.ports == ()
    assert spec.health_check is None
    assert spec.restart == "always"
    assert spec.command is None
    assert spec.capabilities == ()


def test_spec_minimal_canonical_form():
    canonical = parse_app_spec(BASE_BODY, LIMITS).to_dict()

    assert canonical == {
        "name": "web",
        "image": "nginx:1.27",
        "replicas": 1,
        "environment": {},
        "ports": [],
        "restart": "always",
        "capabilities": [],
    }


def test_spec_reference_example_values():
    spec = parse_app_spec(VALID_BODIES["reference example"], LIMITS)

    assert spec.replicas == 2
    assert spec.memory_bytes == 512 * MIB
    assert spec.cpu == 0.5
    assert spec.environment == {"NODE_ENV": "production"}
    assert spec.ports == (PortSpec(container_port=80, protocol="tcp"),)


def test_spec_every_field_values():
    spec = parse_app_spec(VALID_BODIES["every field"], LIMITS)

    assert spec.memory_bytes == 1536 * MIB
    assert spec.cpu == 2.0
    assert list(spec.environment) == ["A", "B", "_X1"]
    assert spec.ports == (
        PortSpec(53, "udp"),
        PortSpec(53, "tcp"),
        PortSpec(8080, "tcp"),
    )
    assert spec.health_check == HealthCheck(
        kind="http",
        port=8080,
        path="/healthz?full=1",
        interval_seconds=10.0,
        timeout_seconds=0.5,
        retries=5,
        start_period_seconds=30.0,
    )
    assert spec.restart == "on-failure"
    assert spec.command == ("/bin/server", "--port", "8080", "")
    assert spec.capabilities == ("NET_ADMIN", "NET_BIND_SERVICE")


def test_health_check_defaults_to_first_tcp_port():
    spec = parse_app_spec(
        body(
            ports=[
                {"container_port": 53, "protocol": "udp"},
                {"container_port": 9090},
                {"container_port": 8080},
            ],
            health_check={"type": "http"},
        ),
        LIMITS,
    )

    assert spec.health_check == HealthCheck(kind="http", port=9090, path="/")
    assert spec.health_check.interval_seconds == 5.0
    assert spec.health_check.timeout_seconds == 2.0
    assert spec.health_check.retries == 3
    assert spec.health_check.start_period_seconds == 0.0


def test_tcp_health_check_has_no_path():
    spec = parse_app_spec(VALID_BODIES["tcp health check"], LIMITS)

    assert spec.health_check.kind == "tcp"
    assert spec.health_check.path is None
    assert "path" not in spec.to_dict()["health_check"]


def test_capabilities_normalised_and_deduplicated():
    spec = parse_app_spec(
        body(capabilities=["net_admin", "CAP_NET_BIND_SERVICE", "NET_ADMIN", "Cap_Net_Admin"]),
        LIMITS,
    )

    assert spec.capabilities == ("NET_ADMIN", "NET_BIND_SERVICE")


def test_capabilities_allowlist_normalised():
    limits = SpecLimits(allowed_capabilities=frozenset({"cap_sys_time"}))

    spec = parse_app_spec(body(capabilities=["SYS_TIME"]), limits)

    assert spec.capabilities == ("SYS_TIME",)


def test_spec_hashable_and_value_equal():
    first = parse_app_spec(body(environment={"B": "2", "A": "1"}), LIMITS)
    second = parse_app_spec(body(environment={"A": "1", "B": "2"}), LIMITS)

    assert first == second
    assert hash(first) == hash(second)
    assert len({first, second}) == 1


def test_environment_repr_hides_values():
    spec = parse_app_spec(body(environment={"TOKEN": "s3cret-value"}), LIMITS)

    assert "s3cret-value" not in repr(spec)
    assert "TOKEN" in repr(spec)


def test_spec_accepts_plain_dict_environment():
    spec = AppSpec(
        name="web",
        image="nginx",
        replicas=1,
        memory_bytes=None,
        cpu=None,
        environment={"B": "2", "A": "1"},
        ports=(),
        health_check=None,
        restart="always",
        command=None,
        capabilities=(),
    )

    assert isinstance(spec.environment, Environment)
    assert list(spec.environment) == ["A", "B"]
    parsed = parse_app_spec(body(image="nginx", environment={"A": "1", "B": "2"}), LIMITS)
    assert spec == parsed
    assert hash(spec) == hash(parsed)


def test_environment_mapping_behaviour():
    environment = Environment({"B": "2", "A": "1"})

    assert environment == {"A": "1", "B": "2"}
    assert environment == Environment([("A", "1"), ("B", "2")])
    assert environment != {"A": "1"}
    assert environment["B"] == "2"
    assert len(environment) == 2
    assert list(environment.items()) == [("A", "1"), ("B", "2")]


BAD_BODIES = [
    # (case id, body, field)
    ("body is a list", [], "body"),
    ("name missing", {"image": "nginx"}, "name"),
    ("image missing", {"name": "web"}, "image"),
    ("unknown top-level field", body(app_id="x"), "app_id"),
    ("name empty", body(name=""), "name"),
    ("name upper-case", body(name="Web"), "name"),
    ("name starts with digit", body(name="1web"), "name"),
    ("name starts with dash", body(name="-web"), "name"),
    ("name ends with dash", body(name="web-"), "name"),
    ("name underscore", body(name="my_app"), "name"),
    ("name dot", body(name="my.app"), "name"),
    ("name 64 characters", body(name="a" * 64), "name"),
    ("name trailing newline", body(name="web\n"), "name"),
    ("name non-ASCII", body(name="wéb"), "name"),
    ("name number", body(name=5), "name"),
    ("name null", body(name=None), "name"),
    ("image empty", body(image=""), "image"),
    ("image upper-case", body(image="Nginx"), "image"),
    ("image bad tag", body(image="nginx:-1"), "image"),
    ("image space", body(image="nginx latest"), "image"),
    ("image number", body(image=7), "image"),
    ("replicas zero", body(replicas=0), "replicas"),
    ("replicas negative", body(replicas=-1), "replicas"),
    ("replicas above limit", body(replicas=11), "replicas"),
    ("resources string", body(resources="512m"), "resources"),
    ("resources unknown field", body(resources={"gpu": 1}), "resources.gpu"),
    ("memory below minimum", body(resources={"memory": "5m"}), "resources.memory"),
    ("memory above maximum", body(resources={"memory": "2t"}), "resources.memory"),
    ("memory garbage", body(resources={"memory": "lots"}), "resources.memory"),
    ("memory float", body(resources={"memory": 536870912.0}), "resources.memory"),
    ("memory boolean", body(resources={"memory": True}), "resources.memory"),
    ("memory null", body(resources={"memory": None}), "resources.memory"),
    ("cpu zero", body(resources={"cpu": 0}), "resources.cpu"),
    ("cpu exponent", body(resources={"cpu": "1e3"}), "resources.cpu"),
    ("cpu too precise", body(resources={"cpu": 0.0005}), "resources.cpu"),
    ("cpu boolean", body(resources={"cpu": True}), "resources.cpu"),
    ("cpu null", body(resources={"cpu": None}), "resources.cpu"),
    ("environment list", body(environment=["A=1"]), "environment"),
    ("environment null", body(environment=None), "environment"),
    ("environment number value", body(environment={"PORT": 8080}), "environment.PORT"),
    ("environment boolean value", body(environment={"DEBUG": True}), "environment.DEBUG"),
    ("environment null value", body(environment={"A": None}), "environment.A"),
    ("environment list value", body(environment={"A": ["1"]}), "environment.A"),
    ("environment name space", body(environment={"MY VAR": "1"}), "environment.MY VAR"),
    ("environment name digit", body(environment={"1A": "1"}), "environment.1A"),
    ("environment name dash", body(environment={"A-B": "1"}), "environment.A-B"),
    ("environment name empty", body(environment={"": "1"}), "environment"),
    ("environment name non-ASCII", body(environment={"ÄB": "1"}), "environment.ÄB"),
    ("environment value NUL", body(environment={"A": "a\0b"}), "environment.A"),
    ("environment value surrogate", body(environment={"A": "\ud800"}), "environment.A"),
    ("environment value too long", body(environment={"A": "x" * 65}), "environment.A"),
    (
        "environment value too many bytes",
        body(environment={"A": "é" * 33}),
        "environment.A",
    ),
    (
        "environment too many entries",
        body(environment={f"V{index}": "1" for index in range(5)}),
        "environment",
    ),
    ("ports object", body(ports={"container_port": 80}), "ports"),
    ("ports null", body(ports=None), "ports"),
    (
        "ports over 32",
        body(ports=[{"container_port": port} for port in range(1, 34)]),
        "ports",
    ),
    ("port entry number", body(ports=[80]), "ports[0]"),
    ("port missing", body(ports=[{"protocol": "tcp"}]), "ports[0].container_port"),
    ("port zero", body(ports=[{"container_port": 0}]), "ports[0].container_port"),
    (
        "port above 65535",
        body(ports=[{"container_port": 80}, {"container_port": 65536}]),
        "ports[1].container_port",
    ),
    (
        "protocol upper-case",
        body(ports=[{"container_port": 80, "protocol": "TCP"}]),
        "ports[0].protocol",
    ),
    (
        "protocol sctp",
        body(ports=[{"container_port": 80, "protocol": "sctp"}]),
        "ports[0].protocol",
    ),
    (
        "port unknown field",
        body(ports=[{"container_port": 80, "host_port": 80}]),
        "ports[0].host_port",
    ),
    (
        "port duplicate",
        body(
            ports=[
                {"container_port": 80},
                {"container_port": 443},
                {"container_port": 80, "protocol": "tcp"},
            ]
        ),
        "ports[2]",
    ),
    ("health check string", body(health_check="http"), "health_check"),
    ("health check type missing", body(health_check={"path": "/"}), "health_check.type"),
    ("health check type grpc", body(health_check={"type": "grpc"}), "health_check.type"),
    (
        "health check no tcp port",
        body(ports=[{"container_port": 53, "protocol": "udp"}], health_check={"type": "tcp"}),
        "health_check.port",
    ),
    ("health check without ports", body(health_check={"type": "http"}), "health_check.port"),
    ("health check port not listed", http_check(port=81), "health_check.port"),
    (
        "health check port listed as udp",
        body(
            ports=[{"container_port": 80}, {"container_port": 53, "protocol": "udp"}],
            health_check={"type": "tcp", "port": 53},
        ),
        "health_check.port",
    ),
    ("health check port zero", tcp_check(port=0), "health_check.port"),
    (
        "health check path without slash",
        http_check(path="healthz"),
        "health_check.path",
    ),
    ("health check path with space", http_check(path="/a b"), "health_check.path"),
    ("health check path non-ASCII", http_check(path="/é"), "health_check.path"),
    (
        "health check path too long",
        http_check(path="/" + "a" * 2048),
        "health_check.path",
    ),
    ("health check path for tcp", tcp_check(path="/"), "health_check.path"),
    (
        "health check interval too short",
        tcp_check(interval_seconds=0.5),
        "health_check.interval_seconds",
    ),
    (
        "health check interval too long",
        tcp_check(interval_seconds=301),
        "health_check.interval_seconds",
    ),
    (
        "health check timeout too short",
        tcp_check(timeout_seconds=0.05),
        "health_check.timeout_seconds",
    ),
    (
        "health check timeout too long",
        tcp_check(interval_seconds=100, timeout_seconds=61),
        "health_check.timeout_seconds",
    ),
    (
        "health check timeout equals interval",
        tcp_check(interval_seconds=2, timeout_seconds=2),
        "health_check.timeout_seconds",
    ),
    ("health check retries zero", tcp_check(retries=0), "health_check.retries"),
    ("health check retries eleven", tcp_check(retries=11), "health_check.retries"),
    (
        "health check start period negative",
        tcp_check(start_period_seconds=-1),
        "health_check.start_period_seconds",
    ),
    (
        "health check start period too long",
        tcp_check(start_period_seconds=601),
        "health_check.start_period_seconds",
    ),
    ("health check unknown field", tcp_check(command="true"), "health_check.command"),
    ("restart capitalised", body(restart="Always"), "restart"),
    ("restart unless-stopped", body(restart="unless-stopped"), "restart"),
    ("restart null", body(restart=None), "restart"),
    ("command string", body(command="nginx -g"), "command"),
    ("command empty", body(command=[]), "command"),
    ("command too long", body(command=["x"] * 65), "command"),
    ("command empty program", body(command=[""]), "command[0]"),
    ("command number argument", body(command=["sleep", 5]), "command[1]"),
    ("command NUL", body(command=["echo", "a\0"]), "command[1]"),
    (
        "command argument too large",
        body(command=["echo", "x" * (MAX_COMMAND_ARGUMENT_BYTES + 1)]),
        "command[1]",
    ),
    ("capabilities string", body(capabilities="NET_ADMIN"), "capabilities"),
    ("capabilities over 64", body(capabilities=["NET_ADMIN"] * 65), "capabilities"),
    ("capability number", body(capabilities=[12]), "capabilities[0]"),
    ("capability not allowed", body(capabilities=["NET_ADMIN", "SYS_ADMIN"]), "capabilities[1]"),
    ("capability space", body(capabilities=["NET ADMIN"]), "capabilities[0]"),
    ("capability empty", body(capabilities=[""]), "capabilities[0]"),
    ("capability prefix only", body(capabilities=["CAP_"]), "capabilities[0]"),
    ("capability dash", body(capabilities=["net-admin"]), "capabilities[0]"),
    # "ı".upper() is "I", so only the ASCII check keeps this from reading as NET_ADMIN.
    ("capability non-ASCII", body(capabilities=["net_adm\u0131n"]), "capabilities[0]"),
]


@pytest.mark.parametrize(
    "data, field",
    [(data, field) for _, data, field in BAD_BODIES],
    ids=[case for case, _, _ in BAD_BODIES],
)
def test_bad_body_names_field(data, field):
    error = rejection(data)

    assert error.status == 400
    assert error.code == "INVALID_REQUEST"
    assert error.details["field"] == field
    assert error.details["issue"]
    assert error.message == f"invalid {field}: {error.details['issue']}"


STRICT_CASES = [
    # (case id, body, field): JSON values of the wrong type that a lax parser would coerce.
    ("replicas string", body(replicas="3"), "replicas"),
    ("replicas boolean", body(replicas=True), "replicas"),
    ("replicas float", body(replicas=3.0), "replicas"),
    ("replicas null", body(replicas=None), "replicas"),
    ("port string", body(ports=[{"container_port": "80"}]), "ports[0].container_port"),
    ("port boolean", body(ports=[{"container_port": True}]), "ports[0].container_port"),
    ("port float", body(ports=[{"container_port": 80.0}]), "ports[0].container_port"),
    ("retries float", tcp_check(retries=3.0), "health_check.retries"),
    (
        "interval string",
        tcp_check(interval_seconds="5"),
        "health_check.interval_seconds",
    ),
    (
        "interval boolean",
        tcp_check(interval_seconds=True),
        "health_check.interval_seconds",
    ),
    ("environment number", body(environment={"N": 1}), "environment.N"),
]


@pytest.mark.parametrize(
    "data, field",
    [(data, field) for _, data, field in STRICT_CASES],
    ids=[case for case, _, _ in STRICT_CASES],
)
def test_strict_json_types(data, field):
    error = rejection(data)

    assert error.status == 400
    assert error.details["field"] == field


@pytest.mark.parametrize(
    "data, field, accepted",
    [
        (
            body(ports_list=[]),
            "ports_list",
            "name, image, replicas, resources, environment, ports, health_check, "
            "restart, command, capabilities, ingress",
        ),
        (body(resources={"disk": "1g"}), "resources.disk", "memory, cpu"),
        (
            body(ports=[{"container_port": 80}, {"port": 81}]),
            "ports[1].port",
            "container_port, protocol",
        ),
        (
            http_check(url="/"),
            "health_check.url",
            "type, path, port, interval_seconds, timeout_seconds, retries, "
            "start_period_seconds",
        ),
    ],
    ids=["top level", "resources", "port", "health check"],
)
def test_unknown_field_lists_accepted(data, field, accepted):
    error = rejection(data)

    assert error.details["field"] == field
    assert error.details["issue"] == f"is not an accepted field (accepted: {accepted})"


def test_replicas_issue_names_range():
    error = rejection(body(replicas=11))

    assert error.details["issue"] == "must be an integer from 1 to 10, or left out for 1"


def test_environment_number_issue_suggests_quotes():
    error = rejection(body(environment={"PORT": 8080}))

    assert error.details["issue"] == (
        'must be a string, not a number. Quote numbers and booleans, as in "8080" or "true"'
    )


def test_environment_issue_hides_value():
    error = rejection(body(environment={"TOKEN": "secret\0value"}))

    assert "secret" not in error.message
    assert "secret" not in error.details["issue"]


def test_environment_long_name_shortened_in_field():
    name = "A" * 300

    error = rejection(body(environment={name: "1"}))

    assert error.details["field"] == "environment." + "A" * 64 + "..."


def test_memory_issue_names_minimum():
    error = rejection(body(resources={"memory": "1m"}))

    assert error.details["issue"] == (
        f"must be at least 6 MiB ({MIN_MEMORY_BYTES} bytes), got {MIB} bytes"
    )


def test_memory_type_issue_shows_format():
    error = rejection(body(resources={"memory": True}))

    assert error.details["issue"].startswith(
        'must be a memory size from 6 MiB to 1 TiB, such as "512m"'
    )


def test_capability_issue_lists_allowed():
    error = rejection(body(capabilities=["SYS_ADMIN"]))

    assert error.details["issue"] == (
        "is not allowed on this node (allowed: NET_ADMIN, NET_BIND_SERVICE)"
    )


def test_capability_rejected_without_allowlist():
    error = rejection(body(capabilities=["NET_ADMIN"]), SpecLimits())

    assert error.details["field"] == "capabilities[0]"
    assert error.details["issue"] == (
        "is not allowed, because this node allows no added capabilities"
    )


def test_duplicate_port_issue_names_first():
    error = rejection(body(ports=[{"container_port": 80}, {"container_port": 80}]))

    assert error.details["issue"].startswith("must not repeat 80/tcp, which ports[0] already lists")


def test_health_timeout_issue_names_interval():
    error = rejection(
        tcp_check(interval_seconds=2, timeout_seconds=3)
    )

    assert error.details["issue"] == "must be less than interval_seconds (2), got 3"


def test_environment_limits_from_settings():
    limits = SpecLimits(max_environment_entries=2, max_environment_value_bytes=3)

    assert parse_app_spec(body(environment={"A": "abc", "B": "é"}), limits).environment == {
        "A": "abc",
        "B": "é",
    }
    assert rejection(body(environment={"A": "abcd"}), limits).details["field"] == "environment.A"
    assert rejection(body(environment={"A": "1", "B": "2", "C": "3"}), limits).details[
        "field"
    ] == "environment"


@pytest.mark.parametrize("replicas", [1, 7, 10])
def test_replicas_within_limit(replicas):
    assert parse_app_spec(body(replicas=replicas), LIMITS).replicas == replicas


@pytest.mark.parametrize("value", [0, 1, 10])
def test_scale_replicas_accepted(value):
    assert check_scale_replicas(value, LIMITS) == value


@pytest.mark.parametrize("value", [-1, 11, "3", True, False, 3.0, None, [3]])
def test_scale_replicas_rejected(value):
    with pytest.raises(ApiError) as caught:
        check_scale_replicas(value, LIMITS)

    assert caught.value.status == 400
    assert caught.value.details["field"] == "replicas"
    assert caught.value.details["issue"] == "must be an integer from 0 to 10"


@pytest.mark.parametrize(
    "text, expected_bytes",
    [
        ("6m", 6 * MIB),
        ("512m", 512 * MIB),
        ("512M", 512 * MIB),
        ("512mb", 512 * MIB),
        ("512MB", 512 * MIB),
        ("512mi", 512 * MIB),
        ("512Mi", 512 * MIB),
        ("512MiB", 512 * MIB),
        ("6144k", 6 * MIB),
        ("6144KB", 6 * MIB),
        ("6144ki", 6 * MIB),
        ("1g", GIB),
        ("1G", GIB),
        ("1gb", GIB),
        ("1GiB", GIB),
        ("1.5g", 1536 * MIB),
        ("0.5g", 512 * MIB),
        ("1t", MAX_MEMORY_BYTES),
        ("1TiB", MAX_MEMORY_BYTES),
        ("1024g", MAX_MEMORY_BYTES),
        ("6291456", MIN_MEMORY_BYTES),
        ("6291456b", MIN_MEMORY_BYTES),
        ("6291456B", MIN_MEMORY_BYTES),
        (6291456, MIN_MEMORY_BYTES),
        (MAX_MEMORY_BYTES, MAX_MEMORY_BYTES),
        ("6.0000001m", MIN_MEMORY_BYTES),  # rounded down to whole bytes
        ("007m", 7 * MIB),
    ],
)
def test_parse_memory_valid(text, expected_bytes):
    assert parse_memory(text) == expected_bytes


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "m",
        "1e9",
        "1E3m",
        "-512m",
        "+512m",
        "0",
        "0m",
        0,
        -MIB * 512,
        "5m",
        "5.99m",
        MIN_MEMORY_BYTES - 1,
        "6291455",
        "1025g",
        "1.0001t",
        "2t",
        MAX_MEMORY_BYTES + 1,
        "9" * 40,
        "512 m",
        " 512m",
        "512m ",
        "1.5",
        "6291456.0",
        "1.5b",
        "512p",
        "512x",
        "512mbb",
        "512bi",
        "0x100m",
        "1,5g",
        ".5g",
        "5.g",
        "\uff15\uff11\uff12m",  # full-width digits
        1.5,
        536870912.0,
        True,
        None,
        [512],
    ],
)
def test_parse_memory_invalid(text):
    with pytest.raises(ValueError) as caught:
        parse_memory(text)

    assert str(caught.value).startswith("must ")


@pytest.mark.parametrize(
    "text, expected_cores",
    [
        ("0.5", 0.5),
        ("2", 2.0),
        (0.5, 0.5),
        (2, 2.0),
        ("0.001", 0.001),
        (0.001, 0.001),
        ("0.250", 0.25),
        ("1.5000", 1.5),
        (0.1, 0.1),
        ("256", 256.0),
        (256, 256.0),
        ("256.000", 256.0),
        (255.999, 255.999),
        ("007", 7.0),
    ],
)
def test_parse_cpu_valid(text, expected_cores):
    cores = parse_cpu(text)

    assert cores == expected_cores
    assert type(cores) is float


@pytest.mark.parametrize(
    "text",
    [
        "abc",
        "",
        "1e3",
        "1E-1",
        "inf",
        "nan",
        "Infinity",
        math.inf,
        -math.inf,
        math.nan,
        True,
        False,
        0,
        0.0,
        "0",
        "0.000",
        -1,
        "-1",
        "+1",
        256.001,
        "257",
        10**30,
        1e300,
        "0.0005",
        0.0005,
        0.1 + 0.2,
        " 1",
        "1 ",
        "1.",
        ".5",
        "1,5",
        None,
        [1],
    ],
)
def test_parse_cpu_invalid(text):
    with pytest.raises(ValueError) as caught:
        parse_cpu(text)

    assert str(caught.value).startswith("must ")


def test_parse_cpu_precision_issue():
    with pytest.raises(ValueError) as caught:
        parse_cpu("0.0005")

    assert str(caught.value).startswith('must have at most 3 decimals, got "0.0005"')


@pytest.mark.parametrize(
    "image",
    [
        "nginx",
        "nginx:latest",
        "nginx:1.27.0-alpine",
        "library/nginx",
        "docker.io/library/nginx:1.27",
        "ghcr.io/owner/app:v1.2.3",
        "localhost/app",
        "localhost:5000/app:dev",
        "registry.example.com:443/team/sub/app",
        "Registry.Example.com/app",
        "[::1]:5000/app",
        "my_app",
        "my__app",
        "my--app",
        "my.app",
        "a",
        "app:_tag",
        "app:" + "t" * 128,
        "x" * 255,
        f"nginx@sha256:{HEX_64}",
        f"nginx:1.27@sha256:{HEX_64}",
        f"localhost:5000/app@sha256:{HEX_64}",
        f"sha256:{HEX_64}",
        "sha256:abc",  # the repository "sha256" with the tag "abc", as Docker reads it
    ],
)
def test_image_reference_valid(image):
    assert image_reference_issue(image) is None
    assert parse_app_spec(body(image=image), LIMITS).image == image


@pytest.mark.parametrize(
    "image",
    [
        "",
        "Nginx",
        "nginx:",
        ":latest",
        "nginx:-1",
        "nginx:.1",
        "app:" + "t" * 129,
        "nginx@sha256:abc",
        f"nginx@md5:{HEX_64}",
        f"nginx@sha256:{HEX_64.upper()}",
        f"@sha256:{HEX_64}",
        "sha256:",
        "-nginx",
        "nginx-",
        "my_-app",
        "my___app",
        "a..b",
        "app/",
        "/app",
        "a//b",
        "registry.example.com/",
        "my_registry:5000/app",
        "localhost:port/app",
        "-registry.example.com/app",
        "nginx latest",
        "nginx\n",
        "x" * 256,
        HEX_64,
        "ünicode",
        "app:tag:tag",
    ],
)
def test_image_reference_invalid(image):
    assert image_reference_issue(image) is not None
    error = rejection(body(image=image))

    assert error.details["field"] == "image"
    assert "must be a Docker image reference" in error.details["issue"]


@pytest.mark.parametrize(
    "image, registry",
    [
        ("nginx", None),
        ("nginx:1.27", None),
        ("library/nginx", None),
        ("owner/app:v1", None),
        (f"nginx@sha256:{HEX_64}", None),
        (f"sha256:{HEX_64}", None),
        ("docker.io/library/nginx", "docker.io"),
        ("ghcr.io/owner/app:v1", "ghcr.io"),
        ("localhost/app", "localhost"),
        ("localhost:5000/app:dev", "localhost:5000"),
        ("[::1]:5000/app", "[::1]:5000"),
        ("registry.example.com:443/team/app", "registry.example.com:443"),
    ],
)
def test_image_registry(image, registry):
    assert image_registry(image) == registry


def test_from_dict_skips_node_limits():
    stored = parse_app_spec(VALID_BODIES["every field"], LIMITS).to_dict()
    stored["replicas"] = 0
    stored["capabilities"] = ["SYS_ADMIN", "SYS_TIME"]
    stored["environment"] = {f"V{index}": "x" * 100 for index in range(200)}

    spec = AppSpec.from_dict(stored)

    assert spec.replicas == 0
    assert spec.capabilities == ("SYS_ADMIN", "SYS_TIME")
    assert len(spec.environment) == 200
    assert spec.to_dict() == stored


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        "spec",
        {},
        {"image": "nginx"},
        {**BASE_BODY, "replicas": -1},
        {**BASE_BODY, "replicas": "2"},
        {**BASE_BODY, "environment": {"A": 1}},
        {**BASE_BODY, "environment": {1: "a"}},
        {**BASE_BODY, "ports": [{"container_port": 80}, {"container_port": 80}]},
        {**BASE_BODY, "resources": {"memory": "5m"}},
        {**BASE_BODY, "capabilities": ["NET ADMIN"]},
        {**BASE_BODY, "extra": 1},
        {**BASE_BODY, "name": "Bad"},
    ],
)
def test_from_dict_rejects_garbage(data):
    with pytest.raises(ValueError, match="invalid stored app spec"):
        AppSpec.from_dict(data)


def test_with_replicas_changes_only_replicas():
    spec = parse_app_spec(VALID_BODIES["every field"], LIMITS)

    scaled = spec.with_replicas(0)

    assert scaled.replicas == 0
    assert scaled == AppSpec.from_dict({**spec.to_dict(), "replicas": 0})
    assert spec.replicas == 10


@pytest.mark.parametrize("replicas", [-1, True, 1.0, "2", None])
def test_with_replicas_rejects_non_count(replicas):
    spec = parse_app_spec(BASE_BODY, LIMITS)

    with pytest.raises(ValueError):
        spec.with_replicas(replicas)


def test_body_json_schema_lists_fields():
    schema = msgspec.json.schema(AppBody)
    app_body = schema["$defs"]["AppBody"]

    assert list(app_body["properties"]) == CANONICAL_KEY_ORDER
    assert app_body["required"] == ["name", "image"]
    assert app_body["additionalProperties"] is False
