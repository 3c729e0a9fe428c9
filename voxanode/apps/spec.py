"""The app spec: validation of the deploy request body into a frozen `AppSpec`.

`parse_app_spec` turns the JSON body of `POST /apps/add_app/` into an `AppSpec`, or
raises ApiError 400 naming the first invalid field as a dotted path, such as
`resources.memory`, `ports[1].container_port` or `environment.MY_VAR`. The body types
are msgspec Structs converted in strict mode, so "3", true and 3.0 are not integers,
and `msgspec.json.schema(AppBody)` is the body's JSON Schema. The limits that come
from the node settings arrive as `SpecLimits` and are checked after conversion.

`AppSpec.to_dict` is the canonical JSON form kept in the app catalogue. It is also a
valid deploy body, and `AppSpec.from_dict` reads it back without the node limits, so a
stored app still loads after an operator lowers a limit.
"""

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Annotated, Any, Literal, get_args

import msgspec
from msgspec import UNSET, Meta, UnsetType

from voxanode.api.errors import ApiError, invalid_field
from voxanode.api.json_body import BODY_FIELD, json_type_name

BYTES_PER_KIB = 1024
BYTES_PER_MIB = 1024**2
# The Docker daemon rejects a memory limit below 6 MiB ("Minimum memory limit allowed
# is 6MB").
MIN_MEMORY_BYTES = 6 * BYTES_PER_MIB
MAX_MEMORY_BYTES = 1024**4
# Docker takes CPU limits as nano_cpus, whole billionths of a core. Specs keep to
# thousandths of a core, which `round(cpu * 1e9)` turns into nano_cpus exactly.
MAX_CPU_CORES = 256
MAX_CPU_DECIMALS = 3

MAX_NAME_CHARACTERS = 63
# The distribution reference grammar limits the name part (without tag or digest).
MAX_IMAGE_NAME_CHARACTERS = 255
MIN_PORT = 1
MAX_PORT = 65535
MAX_PORTS = 32
MAX_COMMAND_ARGUMENTS = 64
MAX_COMMAND_ARGUMENT_BYTES = 32768
MAX_CAPABILITIES = 64
MAX_CAPABILITY_NAME_CHARACTERS = 64
MAX_ENVIRONMENT_NAME_CHARACTERS = 256
MAX_HEALTH_PATH_CHARACTERS = 2048

MIN_HEALTH_INTERVAL_SECONDS = 1.0
MAX_HEALTH_INTERVAL_SECONDS = 300.0
MIN_HEALTH_TIMEOUT_SECONDS = 0.1
MAX_HEALTH_TIMEOUT_SECONDS = 60.0
MIN_HEALTH_RETRIES = 1
MAX_HEALTH_RETRIES = 10
MIN_HEALTH_START_PERIOD_SECONDS = 0.0
MAX_HEALTH_START_PERIOD_SECONDS = 600.0
DEFAULT_HEALTH_INTERVAL_SECONDS = 5.0
DEFAULT_HEALTH_TIMEOUT_SECONDS = 2.0
DEFAULT_HEALTH_RETRIES = 3
DEFAULT_HEALTH_START_PERIOD_SECONDS = 0.0
DEFAULT_HEALTH_PATH = "/"

DEFAULT_REPLICAS = 1
MIN_DEPLOY_REPLICAS = 1

Protocol = Literal["tcp", "udp"]
# Balancing strategies of app ingress, as voxanode.ingress.balancer names them.
IngressStrategy = Literal["round_robin", "least_connections", "latency"]
INGRESS_STRATEGIES: tuple[str, ...] = get_args(IngressStrategy)
RestartPolicy = Literal["always", "on-failure", "never"]
HealthCheckKind = Literal["http", "tcp"]
PROTOCOLS: tuple[str, ...] = get_args(Protocol)
RESTART_POLICIES: tuple[str, ...] = get_args(RestartPolicy)
HEALTH_CHECK_KINDS: tuple[str, ...] = get_args(HealthCheckKind)
DEFAULT_PROTOCOL = "tcp"
DEFAULT_RESTART_POLICY = "always"

MEMORY_FORMAT_HELP = (
    'a memory size from 6 MiB to 1 TiB, such as "512m", "1.5g" or a whole number of '
    'bytes. The units k, m, g and t, optionally followed by "b", "i" or "ib", are '
    "powers of 1024 and may be upper-case"
)
CPU_FORMAT_HELP = (
    f"a number of CPU cores above 0 and at most {MAX_CPU_CORES} with at most "
    f'{MAX_CPU_DECIMALS} decimals, such as 0.5, "0.5" or 2'
)

_NAME_PATTERN = re.compile(r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?")
_ENVIRONMENT_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CAPABILITY_PATTERN = re.compile(r"[A-Z][A-Z0-9_]*")
_HEALTH_PATH_PATTERN = re.compile(r"/[\x21-\x7e]*")

# Image references, from the distribution reference grammar. A path component is
# lower-case alphanumerics joined by ".", "_", "__" or a run of "-".
_IMAGE_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_IMAGE_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_IMAGE_REGISTRY = re.compile(
    rf"(?:{_IMAGE_DOMAIN_COMPONENT}(?:\.{_IMAGE_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])"
    r"(?::[0-9]+)?"
)
_IMAGE_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_IMAGE_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
_HEX_64 = re.compile(r"[a-f0-9]{64}")

# msgspec.ValidationError carries only a message, so the field is read from its text.
# These are msgspec's message shapes, checked with msgspec 0.23. A path to a dict
# value reads `[...]` and a bad dict key reads "at `key` in `$.path`".
_ERROR_LOCATION = re.compile(
    r"(?P<message>.*) - at (?:`key` in )?`\$(?P<path>[^`]*)`", re.DOTALL
)
_MISSING_FIELD_MESSAGE = re.compile(
    r"Object missing required field `(?P<field>.*)`", re.DOTALL
)
_UNKNOWN_FIELD_MESSAGE = re.compile(
    r"Object contains unknown field `(?P<field>.*)`", re.DOTALL
)
_LIST_INDEX = re.compile(r"\[\d+\]")


@dataclass(frozen=True)
class SpecLimits:
    """The node's limits on deploy requests, taken from its settings."""

    # Replicas a deploy may ask for, 1 to max_replicas.
    max_replicas: int = 50
    # Linux capabilities a spec may add, upper-case without "CAP_", such as
    # "NET_BIND_SERVICE". Any other capability is rejected.
    allowed_capabilities: frozenset[str] = frozenset()
    max_environment_entries: int = 128
    # Bytes of UTF-8 in one environment value.
    max_environment_value_bytes: int = 32768


@dataclass(frozen=True)
class PortSpec:
    """A container port the app listens on."""

    container_port: int
    protocol: str  # "tcp" or "udp"

    def to_dict(self) -> dict[str, Any]:
        return {"container_port": self.container_port, "protocol": self.protocol}


@dataclass(frozen=True)
class HealthCheck:
    """A probe run against every instance of the app.

    An instance counts as unhealthy after `retries` failed probes in a row.
    """

    kind: str  # "http" or "tcp"
    port: int  # one of the spec's tcp container ports
    path: str | None  # the URL path an http check requests, None for tcp checks
    interval_seconds: float = DEFAULT_HEALTH_INTERVAL_SECONDS
    timeout_seconds: float = DEFAULT_HEALTH_TIMEOUT_SECONDS  # below interval_seconds
    retries: int = DEFAULT_HEALTH_RETRIES
    # Failures in this time after the start do not count.
    start_period_seconds: float = DEFAULT_HEALTH_START_PERIOD_SECONDS

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"type": self.kind, "port": self.port}
        if self.path is not None:
            data["path"] = self.path
        data["interval_seconds"] = self.interval_seconds
        data["timeout_seconds"] = self.timeout_seconds
        data["retries"] = self.retries
        data["start_period_seconds"] = self.start_period_seconds
        return data


@dataclass(frozen=True)
class IngressSpec:
    """How the app's traffic through the node ingress is balanced, and on which port."""

    strategy: str | None  # one of INGRESS_STRATEGIES, None for the node's default
    port: int | None  # a tcp container port of the spec, None for the first one

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.strategy is not None:
            data["strategy"] = self.strategy
        if self.port is not None:
            data["port"] = self.port
        return data


class Environment(Mapping[str, str]):
    """An immutable, hashable mapping of environment variable names to values.

    Iteration is sorted by name. The repr shows the names only, because values are
    often secrets.
    """

    __slots__ = ("_items", "_values")

    def __init__(self, variables: Mapping[str, str] | Iterable[tuple[str, str]] = ()):
        self._items = tuple(sorted(dict(variables).items()))
        self._values = dict(self._items)

    def __getitem__(self, name: str) -> str:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Environment):
            return self._items == other._items
        return super().__eq__(other)

    def __hash__(self) -> int:
        return hash(self._items)

    def __repr__(self) -> str:
        return f"Environment(names={list(self._values)!r})"


@dataclass(frozen=True)
class AppSpec:
    """A validated application: what to run, how many copies and with which limits."""

    name: str
    image: str
    replicas: int
    memory_bytes: int | None  # None means no memory limit
    cpu: float | None  # CPU cores, None means no CPU limit
    environment: Mapping[str, str]  # an Environment, so the spec stays hashable
    ports: tuple[PortSpec, ...]
    health_check: HealthCheck | None
    restart: str  # "always", "on-failure" or "never"
    command: tuple[str, ...] | None  # argv that replaces the image's command
    capabilities: tuple[str, ...]  # added Linux capabilities, sorted, without "CAP_"
    ingress: IngressSpec | None = None  # None: the node's default strategy, first tcp port

    def __post_init__(self) -> None:
        # Any mapping given becomes an Environment, so the spec stays hashable.
        if not isinstance(self.environment, Environment):
            object.__setattr__(self, "environment", Environment(self.environment))

    def to_dict(self) -> dict[str, Any]:
        """Return the canonical JSON-ready form, which is also a valid deploy body.

        Keys come in a fixed order, and fields that are None are left out.
        """
        data: dict[str, Any] = {
            "name": self.name,
            "image": self.image,
            "replicas": self.replicas,
        }
        resources: dict[str, Any] = {}
        if self.memory_bytes is not None:
            resources["memory"] = self.memory_bytes
        if self.cpu is not None:
            resources["cpu"] = self.cpu
        if resources:
            data["resources"] = resources
        data["environment"] = dict(self.environment)
        data["ports"] = [port.to_dict() for port in self.ports]
        if self.health_check is not None:
            data["health_check"] = self.health_check.to_dict()
        data["restart"] = self.restart
        if self.command is not None:
            data["command"] = list(self.command)
        data["capabilities"] = list(self.capabilities)
        if self.ingress is not None:
            data["ingress"] = self.ingress.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Any) -> "AppSpec":
        """Read back the output of `to_dict`, raising ValueError on malformed data.

        Types and formats are checked as for a deploy, but the node limits are not.
        Replicas may be 0, and any well-formed capability is accepted.
        """
        if not isinstance(data, dict):
            raise ValueError(
                "invalid stored app spec: expected an object, "
                f"got {type(data).__name__}"
            )
        try:
            return _build_spec(data, None)
        except ApiError as error:
            raise ValueError(f"invalid stored app spec: {error.message}") from error

    def with_replicas(self, replicas: int) -> "AppSpec":
        """Return a copy with `replicas` instances, which may be 0 for a stopped app."""
        if type(replicas) is not int or replicas < 0:
            raise ValueError(
                f"replicas must be an integer of at least 0, got {replicas!r}"
            )
        return replace(self, replicas=replicas)


# The docstrings and field descriptions are copied into the JSON Schema.
class ResourcesBody(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Resource limits of each instance. A limit left out means no limit."""

    memory: (
        Annotated[str | int, Meta(description=f"memory limit, {MEMORY_FORMAT_HELP}")]
        | UnsetType
    ) = UNSET
    cpu: (
        Annotated[str | int | float, Meta(description=f"CPU limit, {CPU_FORMAT_HELP}")]
        | UnsetType
    ) = UNSET


class PortBody(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A port the container listens on."""

    container_port: Annotated[int, Meta(ge=MIN_PORT, le=MAX_PORT)]
    protocol: Protocol = DEFAULT_PROTOCOL


class HealthCheckBody(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A health check run against every instance."""

    type: HealthCheckKind
    path: (
        Annotated[
            str,
            Meta(
                max_length=MAX_HEALTH_PATH_CHARACTERS,
                description='URL path of an http check, starting with "/". '
                'Defaults to "/"',
            ),
        ]
        | UnsetType
    ) = UNSET
    port: (
        Annotated[
            int,
            Meta(
                ge=MIN_PORT,
                le=MAX_PORT,
                description='a port listed in "ports" with protocol "tcp". Defaults '
                "to the first such port",
            ),
        ]
        | UnsetType
    ) = UNSET
    interval_seconds: Annotated[
        float, Meta(ge=MIN_HEALTH_INTERVAL_SECONDS, le=MAX_HEALTH_INTERVAL_SECONDS)
    ] = DEFAULT_HEALTH_INTERVAL_SECONDS
    timeout_seconds: Annotated[
        float,
        Meta(
            ge=MIN_HEALTH_TIMEOUT_SECONDS,
            le=MAX_HEALTH_TIMEOUT_SECONDS,
            description="must be less than interval_seconds",
        ),
    ] = DEFAULT_HEALTH_TIMEOUT_SECONDS
    retries: Annotated[
        int,
        Meta(
            ge=MIN_HEALTH_RETRIES,
            le=MAX_HEALTH_RETRIES,
            description="failures in a row that make an instance unhealthy",
        ),
    ] = DEFAULT_HEALTH_RETRIES
    start_period_seconds: Annotated[
        float,
        Meta(
            ge=MIN_HEALTH_START_PERIOD_SECONDS,
            le=MAX_HEALTH_START_PERIOD_SECONDS,
            description="time after the start in which failures do not count",
        ),
    ] = DEFAULT_HEALTH_START_PERIOD_SECONDS


class IngressBody(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """How app traffic through the node ingress (`/proxy/{app}/...`) reaches instances."""

    strategy: (
        Annotated[
            IngressStrategy,
            Meta(
                description="round_robin, least_connections (fewest requests in "
                "flight) or latency (lowest average response time times requests in "
                "flight). Defaults to the node's ingress_strategy"
            ),
        ]
        | UnsetType
    ) = UNSET
    port: (
        Annotated[
            int,
            Meta(
                ge=MIN_PORT,
                le=MAX_PORT,
                description='a port listed in "ports" with protocol "tcp". Defaults '
                "to the first such port",
            ),
        ]
        | UnsetType
    ) = UNSET


class AppBody(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The JSON body of a deploy request."""

    name: Annotated[
        str,
        Meta(
            pattern=f"^{_NAME_PATTERN.pattern}$",
            description="app name, a DNS label: lower-case letters, digits and "
            '"-", starting with a letter and not ending with "-"',
        ),
    ]
    image: Annotated[
        str,
        Meta(description='Docker image reference such as "nginx:1.27"'),
    ]
    replicas: (
        Annotated[
            int,
            Meta(description="number of instances, at most the node's max_replicas"),
        ]
        | UnsetType
    ) = UNSET
    resources: ResourcesBody | UnsetType = UNSET
    environment: (
        Annotated[
            dict[str, str],
            Meta(
                description="environment variables, names matching "
                "[A-Za-z_][A-Za-z0-9_]*"
            ),
        ]
        | UnsetType
    ) = UNSET
    ports: Annotated[list[PortBody], Meta(max_length=MAX_PORTS)] | UnsetType = UNSET
    health_check: HealthCheckBody | UnsetType = UNSET
    restart: RestartPolicy = DEFAULT_RESTART_POLICY
    command: (
        Annotated[
            list[str],
            Meta(
                min_length=1,
                max_length=MAX_COMMAND_ARGUMENTS,
                description="argv that replaces the image's command",
            ),
        ]
        | UnsetType
    ) = UNSET
    capabilities: (
        Annotated[
            list[str],
            Meta(
                max_length=MAX_CAPABILITIES,
                description='Linux capabilities to add, such as "NET_BIND_SERVICE"',
            ),
        ]
        | UnsetType
    ) = UNSET
    ingress: IngressBody | UnsetType = UNSET


# The Struct of each object in the body, by field path without list indexes.
_OBJECT_TYPES: dict[str, type[msgspec.Struct]] = {
    "": AppBody,
    "resources": ResourcesBody,
    "ports[]": PortBody,
    "health_check": HealthCheckBody,
    "ingress": IngressBody,
}


def parse_app_spec(data: dict[str, Any], limits: SpecLimits) -> AppSpec:
    """Validate a parsed deploy body against `limits` and fill in the defaults.

    An explicit null is rejected rather than read as the default. Raises ApiError 400
    naming the first invalid field and what it accepts.
    """
    return _build_spec(data, limits)


def check_scale_replicas(value: Any, limits: SpecLimits) -> int:
    """Return the `replicas` of a scale request, an integer from 0 to max_replicas.

    Raises ApiError 400 for any other JSON value, including "3", true and 3.0.
    """
    if type(value) is not int or not 0 <= value <= limits.max_replicas:
        raise invalid_field(
            "replicas", f"must be an integer from 0 to {limits.max_replicas}"
        )
    return value


def parse_memory(text: str | int) -> int:
    """Return a memory size in bytes, from 6 MiB to 1 TiB.

    Accepts an integer number of bytes, or a string of digits with an optional
    fraction and unit. The units k, m, g and t (case-insensitive, optionally followed
    by "b", "i" or "ib") are powers of 1024, as in Docker, and a lone "b" means bytes.
    A fraction needs a unit, and the size is rounded down to whole bytes. Raises
    ValueError with a message that states what is accepted.
    """
    size_bytes = _memory_bytes(text)
    if size_bytes < MIN_MEMORY_BYTES:
        raise ValueError(
            f"must be at least 6 MiB ({MIN_MEMORY_BYTES} bytes), got {size_bytes} bytes"
        )
    if size_bytes > MAX_MEMORY_BYTES:
        raise ValueError(
            f"must be at most 1 TiB ({MAX_MEMORY_BYTES} bytes), got {size_bytes} bytes"
        )
    return size_bytes


def parse_cpu(text: str | int | float) -> float:
    """Return a CPU limit in cores, above 0 and at most 256, with at most 3 decimals.

    Accepts a JSON number or a string of digits with an optional fraction. Rejects
    booleans, exponents, signs, "inf" and "nan". Raises ValueError with a message that
    states what is accepted.
    """
    cores = _cpu_decimal(text)
    if not 0 < cores <= MAX_CPU_CORES:
        raise ValueError(f"must be {CPU_FORMAT_HELP}, got {_shown(text)}")
    if (cores * 10**MAX_CPU_DECIMALS) % 1 != 0:
        raise ValueError(
            f"must have at most {MAX_CPU_DECIMALS} decimals, got {_shown(text)}. "
            f"Give {CPU_FORMAT_HELP}"
        )
    return float(cores)


def image_reference_issue(image: str) -> str | None:
    """Return what is wrong with a Docker image reference, or None when it is valid.

    Accepts `[registry[:port]/]path[:tag][@sha256:<64 hex>]` as in the distribution
    reference grammar, and a bare image ID `sha256:<64 hex>`.
    """
    if _IMAGE_DIGEST.fullmatch(image):
        return None
    remainder, has_digest, digest = image.partition("@")
    if has_digest and not _IMAGE_DIGEST.fullmatch(digest):
        return (
            "has an invalid digest. A digest must be sha256: and 64 lower-case "
            "hex digits"
        )
    name, tag = _split_image_tag(remainder)
    if tag is not None and not _IMAGE_TAG.fullmatch(tag):
        return (
            "has an invalid tag. A tag is 1 to 128 letters, digits, '_', '.' and '-', "
            "and does not start with '.' or '-'"
        )
    return _image_name_issue(name)


def image_registry(image: str) -> str | None:
    """Return the registry host (with any port) of an image reference.

    Returns None for Docker Hub images and bare image IDs. As in Docker, the first
    path component names a registry when it contains "." or ":" or is "localhost".
    """
    first, has_slash, _ = image.partition("/")
    if not has_slash:
        return None
    if "." in first or ":" in first or first == "localhost":
        return first
    return None


def _build_spec(data: dict[str, Any], limits: SpecLimits | None) -> AppSpec:
    """Convert and check a body. Without `limits`, the node limits are not applied."""
    try:
        body = msgspec.convert(data, AppBody, strict=True)
    except msgspec.ValidationError as error:
        raise _conversion_error(error, data, limits) from error

    _check_name(body.name)
    _check_image(body.image)
    replicas = _check_replicas(body.replicas, limits)
    memory_bytes, cpu = _check_resources(body.resources)
    environment = _check_environment(body.environment, limits)
    ports = _check_ports(body.ports)
    health_check = _check_health_check(body.health_check, ports)
    command = _check_command(body.command)
    capabilities = _check_capabilities(body.capabilities, limits)
    ingress = _check_ingress(body.ingress, ports)

    return AppSpec(
        name=body.name,
        image=body.image,
        replicas=replicas,
        memory_bytes=memory_bytes,
        cpu=cpu,
        environment=environment,
        ports=ports,
        health_check=health_check,
        restart=body.restart,
        command=command,
        capabilities=capabilities,
        ingress=ingress,
    )


def _check_name(name: str) -> None:
    if not _NAME_PATTERN.fullmatch(name):
        raise invalid_field("name", _name_issue())


def _check_image(image: str) -> None:
    issue = image_reference_issue(image)
    if issue is not None:
        raise invalid_field("image", f"{issue}. It {_image_issue()}")


def _check_replicas(replicas: int | UnsetType, limits: SpecLimits | None) -> int:
    if replicas is UNSET:
        return DEFAULT_REPLICAS
    if limits is None:
        if replicas < 0:
            raise invalid_field("replicas", _replicas_issue(limits))
    elif not MIN_DEPLOY_REPLICAS <= replicas <= limits.max_replicas:
        raise invalid_field("replicas", _replicas_issue(limits))
    return replicas


def _check_resources(
    resources: ResourcesBody | UnsetType,
) -> tuple[int | None, float | None]:
    if resources is UNSET:
        return None, None

    memory_bytes = None
    if resources.memory is not UNSET:
        try:
            memory_bytes = parse_memory(resources.memory)
        except ValueError as error:
            raise invalid_field("resources.memory", str(error)) from error

    cpu = None
    if resources.cpu is not UNSET:
        try:
            cpu = parse_cpu(resources.cpu)
        except ValueError as error:
            raise invalid_field("resources.cpu", str(error)) from error
    return memory_bytes, cpu


def _check_environment(
    variables: dict[str, str] | UnsetType, limits: SpecLimits | None
) -> Environment:
    if variables is UNSET:
        return Environment()
    if limits is not None and len(variables) > limits.max_environment_entries:
        raise invalid_field(
            "environment",
            f"must have at most {limits.max_environment_entries} variables, "
            f"got {len(variables)}",
        )
    for name, value in variables.items():
        if not name:
            raise invalid_field("environment", "has a variable with an empty name")
        field_path = f"environment.{_shorten(name)}"
        issue = _environment_name_issue(name) or _environment_value_issue(value, limits)
        if issue is not None:
            raise invalid_field(field_path, issue)
    return Environment(variables)


def _environment_name_issue(name: str) -> str | None:
    if len(name) > MAX_ENVIRONMENT_NAME_CHARACTERS or not (
        _ENVIRONMENT_NAME_PATTERN.fullmatch(name)
    ):
        return (
            "is not a valid variable name. A name is 1 to "
            f"{MAX_ENVIRONMENT_NAME_CHARACTERS} ASCII letters, digits and '_', and "
            "does not start with a digit"
        )
    return None


def _environment_value_issue(value: str, limits: SpecLimits | None) -> str | None:
    """Return what is wrong with a variable's value. The value itself is never shown."""
    if "\0" in value:
        return "must be a string without NUL characters"
    try:
        size_bytes = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return "must be valid Unicode text without lone surrogates"
    if limits is not None and size_bytes > limits.max_environment_value_bytes:
        return (
            f"must be at most {limits.max_environment_value_bytes} bytes of UTF-8, "
            f"got {size_bytes}"
        )
    return None


def _check_ports(ports: list[PortBody] | UnsetType) -> tuple[PortSpec, ...]:
    if ports is UNSET:
        return ()
    first_index: dict[tuple[int, str], int] = {}
    for index, port in enumerate(ports):
        pair = (port.container_port, port.protocol)
        if pair in first_index:
            raise invalid_field(
                f"ports[{index}]",
                f"must not repeat {port.container_port}/{port.protocol}, which "
                f"ports[{first_index[pair]}] already lists. Each port and protocol "
                "pair may be listed once",
            )
        first_index[pair] = index
    return tuple(PortSpec(port.container_port, port.protocol) for port in ports)


def _check_health_check(
    body: HealthCheckBody | UnsetType, ports: tuple[PortSpec, ...]
) -> HealthCheck | None:
    if body is UNSET:
        return None

    path = _check_health_path(body)
    port = _check_health_port(body.port, ports)
    if body.timeout_seconds >= body.interval_seconds:
        raise invalid_field(
            "health_check.timeout_seconds",
            f"must be less than interval_seconds ({body.interval_seconds:g}), "
            f"got {body.timeout_seconds:g}",
        )
    return HealthCheck(
        kind=body.type,
        port=port,
        path=path,
        interval_seconds=body.interval_seconds,
        timeout_seconds=body.timeout_seconds,
        retries=body.retries,
        start_period_seconds=body.start_period_seconds,
    )


def _check_health_path(body: HealthCheckBody) -> str | None:
    if body.type != "http":
        if body.path is not UNSET:
            raise invalid_field(
                "health_check.path",
                f'must be left out when type is "{body.type}", because only http '
                "checks request a path",
            )
        return None
    if body.path is UNSET:
        return DEFAULT_HEALTH_PATH
    if not _HEALTH_PATH_PATTERN.fullmatch(body.path):
        raise invalid_field("health_check.path", _health_path_issue())
    return body.path


def _check_health_port(port: int | UnsetType, ports: tuple[PortSpec, ...]) -> int:
    tcp_ports = [spec.container_port for spec in ports if spec.protocol == "tcp"]
    if not tcp_ports:
        raise invalid_field(
            "health_check.port",
            'must be a port that "ports" lists with protocol "tcp", but "ports" '
            "lists no tcp port",
        )
    if port is UNSET:
        return tcp_ports[0]
    if port not in tcp_ports:
        listed = ", ".join(str(number) for number in tcp_ports)
        raise invalid_field(
            "health_check.port",
            f'must be one of the tcp ports that "ports" lists ({listed}), got {port}',
        )
    return port


def _check_ingress(body: IngressBody | UnsetType, ports: tuple[PortSpec, ...]) -> IngressSpec | None:
    if body is UNSET:
        return None
    port = None
    if body.port is not UNSET:
        tcp_ports = [spec.container_port for spec in ports if spec.protocol == "tcp"]
        if body.port not in tcp_ports:
            listed = ", ".join(str(number) for number in tcp_ports) or "none"
            raise invalid_field(
                "ingress.port",
                f'must be one of the tcp ports that "ports" lists ({listed}), got {body.port}',
            )
        port = body.port
    strategy = None if body.strategy is UNSET else body.strategy
    return IngressSpec(strategy=strategy, port=port)


def _check_command(command: list[str] | UnsetType) -> tuple[str, ...] | None:
    if command is UNSET:
        return None
    for index, argument in enumerate(command):
        issue = _command_argument_issue(argument)
        if issue is None and index == 0 and not argument:
            issue = "must name the program to run, so it must not be empty"
        if issue is not None:
            raise invalid_field(f"command[{index}]", issue)
    return tuple(command)


def _command_argument_issue(argument: str) -> str | None:
    if "\0" in argument:
        return "must be a string without NUL characters"
    try:
        size_bytes = len(argument.encode("utf-8"))
    except UnicodeEncodeError:
        return "must be valid Unicode text without lone surrogates"
    if size_bytes > MAX_COMMAND_ARGUMENT_BYTES:
        return (
            f"must be at most {MAX_COMMAND_ARGUMENT_BYTES} bytes of UTF-8, "
            f"got {size_bytes}"
        )
    return None


def _check_capabilities(
    capabilities: list[str] | UnsetType, limits: SpecLimits | None
) -> tuple[str, ...]:
    """Return the capabilities upper-cased, without "CAP_", deduplicated and sorted."""
    if capabilities is UNSET:
        return ()
    allowed = None
    if limits is not None:
        allowed = {_normal_capability(name) for name in limits.allowed_capabilities}

    normalised = set()
    for index, name in enumerate(capabilities):
        capability = _normal_capability(name)
        # The ASCII check comes first, because str.upper() maps some non-ASCII
        # letters to ASCII ones ("ı" becomes "I").
        if (
            not name.isascii()
            or len(capability) > MAX_CAPABILITY_NAME_CHARACTERS
            or not _CAPABILITY_PATTERN.fullmatch(capability)
        ):
            raise invalid_field(f"capabilities[{index}]", _capability_name_issue())
        if allowed is not None and capability not in allowed:
            raise invalid_field(
                f"capabilities[{index}]", _capability_allowed_issue(allowed)
            )
        normalised.add(capability)
    return tuple(sorted(normalised))


def _normal_capability(name: str) -> str:
    return name.upper().removeprefix("CAP_")


def _memory_bytes(text: str | int) -> int:
    """Return the size in bytes that `text` states, before the range check."""
    if type(text) is int:
        return text
    if not isinstance(text, str):
        raise ValueError(f"must be {MEMORY_FORMAT_HELP}, got {_shown(text)}")

    match = re.fullmatch(
        r"(?P<number>[0-9]+(?:\.[0-9]+)?)(?:(?P<unit>[kmgt])(?:i?b|i)?|b)?",
        text,
        re.IGNORECASE | re.ASCII,
    )
    if match is None:
        raise ValueError(f"must be {MEMORY_FORMAT_HELP}, got {_shown(text)}")
    number = Decimal(match["number"])
    unit = match["unit"]
    if unit is None:
        if "." in match["number"]:
            raise ValueError(
                "must have a unit of k, m, g or t to have a fraction, "
                f"got {_shown(text)}. "
                f"Give {MEMORY_FORMAT_HELP}"
            )
        return int(number)
    exponent = "kmgt".index(unit.lower()) + 1
    return int(number * BYTES_PER_KIB**exponent)


def _cpu_decimal(text: str | int | float) -> Decimal:
    """Return the exact number that `text` states, before the range checks."""
    if type(text) is int:
        return Decimal(text)
    if type(text) is float:
        if not math.isfinite(text):
            raise ValueError(f"must be {CPU_FORMAT_HELP}, got {text!r}")
        # str() of a float is its shortest round-tripping decimal form.
        return Decimal(str(text))
    if isinstance(text, str) and re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", text, re.ASCII):
        return Decimal(text)
    raise ValueError(f"must be {CPU_FORMAT_HELP}, got {_shown(text)}")


def _split_image_tag(reference: str) -> tuple[str, str | None]:
    """Split `name:tag`. A ':' before the last '/' belongs to a registry port."""
    name, colon, tag = reference.rpartition(":")
    if not colon or "/" in tag:
        return reference, None
    return name, tag


def _image_name_issue(name: str) -> str | None:
    if not name:
        return "has no repository name"
    if len(name) > MAX_IMAGE_NAME_CHARACTERS:
        return (
            f"has a repository name of {len(name)} characters, but at most "
            f"{MAX_IMAGE_NAME_CHARACTERS} are accepted"
        )
    if _HEX_64.fullmatch(name):
        return 'has a 64 hex digit repository name. Write an image ID as "sha256:<id>"'

    components = name.split("/")
    if len(components) > 1 and image_registry(name) is not None:
        if not _IMAGE_REGISTRY.fullmatch(components[0]):
            return (
                "has an invalid registry host. A host is a DNS name or [IPv6] "
                "with an optional :port"
            )
        components = components[1:]
    for component in components:
        if not _IMAGE_PATH_COMPONENT.fullmatch(component):
            return (
                "has an invalid repository path. Each part between '/' is lower-case "
                "letters and digits, joined by '.', '_', '__' or a run of '-'"
            )
    return None


def _conversion_error(
    error: msgspec.ValidationError, data: Any, limits: SpecLimits | None
) -> ApiError:
    """Build the 400 error for the field that msgspec names in `error`."""
    message = str(error)
    # Errors in the top-level object itself have no location, so their path is "".
    path = ""
    located = _ERROR_LOCATION.fullmatch(message)
    if located is not None:
        message = located["message"]
        path = located["path"].removeprefix(".")
    rule = _LIST_INDEX.sub("[]", path)

    missing = _MISSING_FIELD_MESSAGE.fullmatch(message)
    if missing is not None:
        return invalid_field(_join_path(path, missing["field"]), "is required")

    unknown = _UNKNOWN_FIELD_MESSAGE.fullmatch(message)
    if unknown is not None and rule in _OBJECT_TYPES:
        accepted = ", ".join(
            field.encode_name for field in msgspec.structs.fields(_OBJECT_TYPES[rule])
        )
        return invalid_field(
            _join_path(path, unknown["field"]),
            f"is not an accepted field (accepted: {accepted})",
        )

    if not path and not isinstance(data, dict):
        return invalid_field(
            BODY_FIELD, f"must be a JSON object, not {json_type_name(data)}"
        )
    if rule.startswith("environment") and isinstance(data, dict):
        environment_error = _environment_type_error(data.get("environment"))
        if environment_error is not None:
            return environment_error

    # A wrong JSON type or a failed Meta constraint. The issue is the field's whole
    # rule, so it does not depend on which of the two failed.
    issue = _field_rule_issue(rule, limits)
    if issue is not None:
        return invalid_field(path, issue)

    # NOTE: a message shape not matched above (a msgspec release that rewords its
    # errors) is passed on whole, so the client still learns what failed.
    return invalid_field(BODY_FIELD, f"is invalid: {str(error)}")


def _environment_type_error(variables: Any) -> ApiError | None:
    """Build the error for the first variable whose name or value is not a string."""
    if not isinstance(variables, dict):
        return None
    for name, value in variables.items():
        if not isinstance(name, str):
            return invalid_field("environment", f"must have string names, got {name!r}")
        if not isinstance(value, str):
            return invalid_field(
                f"environment.{_shorten(name)}",
                f"must be a string, not {json_type_name(value)}. Quote numbers and "
                'booleans, as in "8080" or "true"',
            )
    return None


def _field_rule_issue(rule: str, limits: SpecLimits | None) -> str | None:
    """Return the accepted form of the field at `rule`, a path without list indexes."""
    if rule == "replicas":
        return _replicas_issue(limits)
    issues = {
        "name": "must be a string. It " + _name_issue(),
        "image": _image_issue(),
        "resources": 'must be an object with the optional fields "memory" and "cpu"',
        "resources.memory": f"must be {MEMORY_FORMAT_HELP}",
        "resources.cpu": f"must be {CPU_FORMAT_HELP}",
        "environment": "must be an object that maps variable names to string values",
        "ports": (
            f"must be a list of at most {MAX_PORTS} objects such as "
            '{"container_port": 80, "protocol": "tcp"}'
        ),
        "ports[]": (
            'must be an object such as {"container_port": 80, "protocol": "tcp"}'
        ),
        "ports[].container_port": (
            f"must be an integer port from {MIN_PORT} to {MAX_PORT}"
        ),
        "ports[].protocol": _choice_issue(PROTOCOLS),
        "health_check": (
            'must be an object such as {"type": "http", "path": "/healthz"} '
            'or {"type": "tcp"}'
        ),
        "health_check.type": _choice_issue(HEALTH_CHECK_KINDS),
        "health_check.path": _health_path_issue(),
        "health_check.port": (
            f"must be an integer port from {MIN_PORT} to {MAX_PORT} that "
            '"ports" lists with protocol "tcp"'
        ),
        "health_check.interval_seconds": _seconds_issue(
            MIN_HEALTH_INTERVAL_SECONDS, MAX_HEALTH_INTERVAL_SECONDS
        ),
        "health_check.timeout_seconds": _seconds_issue(
            MIN_HEALTH_TIMEOUT_SECONDS, MAX_HEALTH_TIMEOUT_SECONDS
        )
        + ", less than interval_seconds",
        "health_check.retries": (
            f"must be an integer from {MIN_HEALTH_RETRIES} to {MAX_HEALTH_RETRIES}"
        ),
        "health_check.start_period_seconds": _seconds_issue(
            MIN_HEALTH_START_PERIOD_SECONDS, MAX_HEALTH_START_PERIOD_SECONDS
        ),
        "restart": _choice_issue(RESTART_POLICIES),
        "command": (
            f"must be a list of 1 to {MAX_COMMAND_ARGUMENTS} strings, the program "
            "and its arguments"
        ),
        "command[]": "must be a string",
        "capabilities": (
            f"must be a list of at most {MAX_CAPABILITIES} capability names such "
            'as "NET_BIND_SERVICE"'
        ),
        "capabilities[]": 'must be a capability name string such as "NET_BIND_SERVICE"',
        "ingress": (
            'must be an object such as {"strategy": "least_connections"} with the '
            'optional fields "strategy" and "port"'
        ),
        "ingress.strategy": _choice_issue(INGRESS_STRATEGIES),
        "ingress.port": (
            f"must be an integer port from {MIN_PORT} to {MAX_PORT} that "
            '"ports" lists with protocol "tcp"'
        ),
    }
    return issues.get(rule)


def _name_issue() -> str:
    return (
        f"must be a DNS label of 1 to {MAX_NAME_CHARACTERS} characters: lower-case "
        'letters, digits and "-", starting with a letter and not ending with "-"'
    )


def _image_issue() -> str:
    return (
        'must be a Docker image reference such as "nginx", "nginx:1.27", '
        '"ghcr.io/owner/app:v1", "name@sha256:<64 hex digits>" or an image ID '
        '"sha256:<64 hex digits>"'
    )


def _replicas_issue(limits: SpecLimits | None) -> str:
    if limits is None:
        return "must be an integer of at least 0"
    return (
        f"must be an integer from {MIN_DEPLOY_REPLICAS} to {limits.max_replicas}, "
        f"or left out for {DEFAULT_REPLICAS}"
    )


def _health_path_issue() -> str:
    return (
        f'must be a URL path such as "/healthz": at most {MAX_HEALTH_PATH_CHARACTERS} '
        'visible ASCII characters, starting with "/"'
    )


def _seconds_issue(minimum: float, maximum: float) -> str:
    return f"must be a number of seconds from {minimum:g} to {maximum:g}"


def _choice_issue(choices: tuple[str, ...]) -> str:
    quoted = [f'"{choice}"' for choice in choices]
    return f"must be {', '.join(quoted[:-1])} or {quoted[-1]}"


def _capability_name_issue() -> str:
    return (
        'must be a Linux capability name such as "NET_BIND_SERVICE" or '
        '"CAP_NET_BIND_SERVICE": letters, digits and "_", starting with a letter'
    )


def _capability_allowed_issue(allowed: set[str]) -> str:
    if not allowed:
        return "is not allowed, because this node allows no added capabilities"
    return f"is not allowed on this node (allowed: {', '.join(sorted(allowed))})"


def _join_path(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _shorten(text: str, max_characters: int = 64) -> str:
    if len(text) <= max_characters:
        return text
    return text[:max_characters] + "..."


def _shown(value: Any) -> str:
    """Return a short quoted form of a client value for an error message."""
    if isinstance(value, str):
        return f'"{_shorten(value, 40)}"'
    return _shorten(repr(value), 40)
