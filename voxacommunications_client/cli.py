"""voxa-cli: the command line for a voxanode network, built on VoxaClient.

`main` is the console script. It runs the click command tree and turns each error into
one line on stderr, `error: CODE: message (field: X) - what to do`, and an exit status
(see ExitStatus). The commands themselves handle no errors, except that Ctrl-C ends a
log or event stream with status 0.

Every command prints a human table, or with --json the result's `to_dict()` as JSON;
the streams (`app logs`, `events`) print one JSON object per line. Tables, progress
bars, warnings and errors are meant for people: scripts should use --json and the exit
status. Progress bars, warnings and errors go to stderr, so stdout holds only results.
"""

import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any, NoReturn

import click
from click.shell_completion import get_completion_class
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from voxacommunications_client import VoxaClient, errors
from voxacommunications_client.cli_config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_TIMEOUT_SECONDS,
    DEFAULT_URL,
    ConfigError,
    ConnectionSettings,
    config_file_path,
    read_config_file,
    resolve_settings,
    token_file_warning,
    url_problem,
)
from voxacommunications_client.models import (
    App,
    AppStatus,
    Event,
    LogEntry,
    PublishedPort,
)

logger = logging.getLogger(__name__)

PROG_NAME = "voxa-cli"
# The environment variable that click's completion scripts set when they call voxa-cli.
COMPLETE_VARIABLE = "_VOXA_CLI_COMPLETE"
COMPLETION_SHELLS = ("bash", "zsh")

APP_STATUSES = ("deploying", "running", "degraded", "stopped", "failed")
NODE_STATUSES = ("online", "suspect", "offline", "left")
RESTART_POLICIES = ("always", "on-failure", "never")
PORT_PROTOCOLS = ("tcp", "udp")
# Click 8.2 and later raise this for a group called without a subcommand; 8.1 prints the
# help and exits 0 instead, and an empty tuple catches nothing.
NO_ARGS_IS_HELP_ERROR = getattr(click.exceptions, "NoArgsIsHelpError", ())

DEFAULT_WAIT_TIMEOUT_SECONDS = 120.0
DEFAULT_LOG_TAIL_LINES = 100
# The node accepts at most this many lines of history per instance.
MAX_LOG_TAIL_LINES = 10_000
DEFAULT_LIST_LIMIT = 50
# Table width when stdout is not a terminal and COLUMNS is unset. Rich would wrap at 80
# columns there and split ids over lines; a table only grows as wide as its cells need.
PIPE_TABLE_WIDTH_CHARACTERS = 240


class ExitStatus(IntEnum):
    """Exit statuses of voxa-cli."""

    OK = 0
    # The node returned an error, or a deployment that --wait watched failed or timed out.
    API_ERROR = 1
    # Invalid flags or arguments (click's status), or an invalid config file or setting.
    USAGE_ERROR = 2
    # The node could not be reached or did not reply in time.
    CONNECTION_FAILED = 3
    # Ctrl-C outside a log or event stream, by the shell's convention 128 + SIGINT.
    INTERRUPTED = 130


# --- shared state -------------------------------------------------------------------


@dataclass
class CliState:
    """The global options of one run, and the client built from them on first use."""

    url: str | None
    token: str | None = field(repr=False)
    timeout_seconds: float | None
    config_path: str | None
    client: VoxaClient | None = None

    def connection_settings(self) -> ConnectionSettings:
        """Resolve the connection settings, reading the config file.

        Only commands that connect call this, so a broken config file does not stop
        `completion` or `--help`.
        """
        path, required = config_file_path(self.config_path)
        file_values = read_config_file(path, required)
        warning = token_file_warning(path, file_values)
        if warning:
            click.echo(f"warning: {warning}", err=True)
        return resolve_settings(self.url, self.token, self.timeout_seconds, file_values)

    def open_client(self, ctx: click.Context) -> VoxaClient:
        """Return the client, creating it on the first call; it is closed when the run ends."""
        if self.client is None:
            settings = self.connection_settings()
            logger.debug("connecting to %s, timeout %.1f s, token %s", settings.url, settings.timeout_seconds,
                         "set" if settings.token else "not set")
            self.client = VoxaClient(settings.url, token=settings.token, timeout=settings.timeout_seconds)
            ctx.call_on_close(self.client.close)
        return self.client


def client_of(ctx: click.Context) -> VoxaClient:
    """Return the client of the run that `ctx` belongs to."""
    return ctx.find_object(CliState).open_client(ctx)


# --- output ---------------------------------------------------------------------------


def make_console(*, stderr: bool = False) -> Console:
    """Build a rich console on stdout or stderr that wraps tables only at a terminal's width."""
    stream = sys.stderr if stderr else sys.stdout
    width = None
    if not stream.isatty() and "COLUMNS" not in os.environ:
        width = PIPE_TABLE_WIDTH_CHARACTERS
    return Console(stderr=stderr, width=width, highlight=False, soft_wrap=False)


def show(console: Console, renderable: Any) -> None:
    """Print a table or text; off a terminal, without the padding that rich adds at line ends."""
    if console.is_terminal:
        console.print(renderable)
        return
    with console.capture() as capture:
        console.print(renderable)
    for line in capture.get().splitlines():
        click.echo(line.rstrip(), err=console.stderr)


def print_json(data: Any) -> None:
    """Print `data` as indented JSON on stdout."""
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def print_json_line(data: Any) -> None:
    """Print `data` as compact JSON on one line of stdout."""
    click.echo(json.dumps(data, separators=(",", ":"), ensure_ascii=False))


def format_time(moment: datetime | None, *, milliseconds: bool = False) -> str:
    """Format an aware datetime as UTC ISO 8601 with a Z, or '-' for None."""
    if moment is None:
        return "-"
    text = moment.astimezone(UTC).isoformat(timespec="milliseconds" if milliseconds else "seconds")
    return text.replace("+00:00", "Z")


def cell_text(value: Any) -> str:
    """Render one table cell: '-' for None, lists joined with commas, times in UTC."""
    if value is None or value == "":
        return "-"
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{round(value, 1):g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(cell_text(item) for item in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return str(value)


def new_table(*columns: str, wrap: Sequence[str] = ()) -> Table:
    """Build a table with a bold header row, no borders and two spaces between columns.

    On a narrow terminal only the columns named in `wrap` break over lines, so ids and
    times stay whole.
    """
    table = Table(box=None, padding=(0, 2, 0, 0), pad_edge=False, header_style="bold")
    for column in columns:
        if column in wrap:
            table.add_column(column, overflow="fold")
        else:
            table.add_column(column, no_wrap=True)
    return table


def add_row(table: Table, *cells: Any) -> None:
    # Text cells, so brackets in names and messages are not read as rich markup.
    table.add_row(*(Text(cell_text(cell)) for cell in cells))


def print_fields(console: Console, rows: Iterable[tuple[str, Any]]) -> None:
    """Print label/value pairs as a two-column table."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for label, value in rows:
        table.add_row(Text(label), Text(cell_text(value)))
    show(console, table)


def print_stream(items: Iterator[Any], render: Callable[[Any], None]) -> None:
    """Render each item of a log or event stream until it ends or Ctrl-C is pressed."""
    try:
        for item in items:
            render(item)
    except KeyboardInterrupt:
        logger.debug("stream stopped by Ctrl-C")
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()


def json_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(function)


# --- option parsing -------------------------------------------------------------------


def check_url_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    problem = url_problem(value) if value is not None else None
    if problem:
        raise click.BadParameter(problem, ctx=ctx, param=param)
    return value


def parse_environment(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> dict[str, str]:
    """Turn repeated KEY=VALUE options into a dict; the value may contain '='."""
    environment: dict[str, str] = {}
    for item in values:
        name, separator, value = item.partition("=")
        if not separator or not name:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", ctx=ctx, param=param)
        environment[name] = value
    return environment


def parse_ports(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> list[dict[str, Any]]:
    """Turn repeated PORT[/PROTOCOL] options into the deploy body's port objects."""
    ports = []
    for item in values:
        number, _, protocol = item.partition("/")
        protocol = protocol.lower() or "tcp"
        if not number.isdigit() or protocol not in PORT_PROTOCOLS:
            raise click.BadParameter(f"{item!r} is not PORT, PORT/tcp or PORT/udp", ctx=ctx, param=param)
        ports.append({"container_port": int(number), "protocol": protocol})
    return ports


def parse_data_value(text: str) -> Any:
    """Parse a data value as JSON, or keep it as a string when it is not valid JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_event_types(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    types = [name.strip() for name in value.split(",") if name.strip()]
    if not types:
        raise click.BadParameter("list at least one event type, such as node_joined,app_failed", ctx=ctx, param=param)
    return types


# --- the command tree -------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--url", envvar="VOXA_URL", show_envvar=True, metavar="URL", callback=check_url_option,
              help=f"API URL of the node to talk to. [default: url in the config file, else {DEFAULT_URL}]")
@click.option("--token", envvar="VOXA_TOKEN", show_envvar=True, metavar="TOKEN",
              help="Bearer token, for nodes that run without --dev. Prefer VOXA_TOKEN: other users see flags in ps.")
@click.option("--timeout", "timeout_seconds", envvar="VOXA_TIMEOUT", show_envvar=True,
              type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help=f"Seconds to wait for each reply. [default: timeout in the config file, else {DEFAULT_TIMEOUT_SECONDS:g}]")
@click.option("--config", "config_path", envvar="VOXA_CLI_CONFIG", show_envvar=True, metavar="FILE",
              help=f"TOML file with url, token and timeout keys. [default: {DEFAULT_CONFIG_PATH}, if it exists]")
@click.option("-v", "--verbose", is_flag=True, help="Log the client's requests and retries to stderr.")
@click.pass_context
def cli(ctx: click.Context, url: str | None, token: str | None, timeout_seconds: float | None,
        config_path: str | None, verbose: bool) -> None:
    """Deploy apps, store data and watch a voxanode network through one node's API."""
    if verbose:
        enable_debug_log()
    ctx.obj = CliState(url=url, token=token, timeout_seconds=timeout_seconds, config_path=config_path)


def enable_debug_log() -> None:
    """Send this package's DEBUG log lines, and only them, to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    package_logger = logging.getLogger("voxacommunications_client")
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.DEBUG)


@cli.group()
def app() -> None:
    """Deploy, inspect, scale and stop apps."""


@app.command("deploy")
@click.option("--name", required=True, help="App name: lower-case letters, digits and '-', starting with a letter.")
@click.option("--image", required=True, help="Container image; by default nodes run only images they already have.")
@click.option("--replicas", type=int, default=1, show_default=True, help="Number of instances to run.")
@click.option("--memory", default="512m", show_default=True, help="Memory limit of each instance, such as 64m or 1.5g.")
@click.option("--cpu", default="0.5", show_default=True, help="CPU cores of each instance, such as 0.25 or 2.")
@click.option("--env", "environment", multiple=True, metavar="KEY=VALUE", callback=parse_environment,
              help="Environment variable of the containers; repeatable.")
@click.option("--port", "ports", multiple=True, metavar="PORT[/tcp|/udp]", callback=parse_ports,
              help="Container port to publish on the node; repeatable.")
@click.option("--health-path", metavar="PATH",
              help="HTTP path to probe on the first tcp port. Without it, a running container counts as healthy.")
@click.option("--restart", type=click.Choice(RESTART_POLICIES), default="always", show_default=True,
              help="When a node restarts a stopped container.")
@click.option("--wait", is_flag=True,
              help="Show progress until every replica runs; exit 1 if the app fails or --timeout passes.")
@click.option("--timeout", "wait_timeout_seconds", type=click.FloatRange(min=0, min_open=True),
              default=DEFAULT_WAIT_TIMEOUT_SECONDS, show_default=True, metavar="SECONDS",
              help="Seconds --wait waits for the replicas to run.")
@json_option
@click.pass_context
def app_deploy(ctx: click.Context, name: str, image: str, replicas: int, memory: str, cpu: str,
               environment: dict[str, str], ports: list[dict[str, Any]], health_path: str | None,
               restart: str, wait: bool, wait_timeout_seconds: float, as_json: bool) -> None:
    """Deploy an app. With --wait and --json, print the final app status instead of the deploy result."""
    client = client_of(ctx)
    health_check = {"type": "http", "path": health_path} if health_path else None
    deployed = client.apps.deploy(
        name, image, replicas,
        resources={"memory": memory, "cpu": cpu},
        environment=environment or None,
        ports=ports or None,
        health_check=health_check,
        restart=restart,
    )
    if not wait:
        if as_json:
            print_json(deployed.to_dict())
        else:
            print_deployed(deployed)
        return

    if not as_json:
        print_deployed(deployed)
        click.echo()
    status = wait_with_progress(client, deployed.id, deployed.name, replicas, wait_timeout_seconds)
    if as_json:
        print_json(status.to_dict())
    else:
        print_app_status(status)


def print_deployed(deployed: App) -> None:
    print_fields(make_console(), [
        ("app id", deployed.id),
        ("name", deployed.name),
        ("status", deployed.status),
        ("nodes", deployed.nodes_deployed),
        ("instances", deployed.instances_created),
        ("message", deployed.message),
    ])


def wait_with_progress(client: VoxaClient, app_id: str, name: str, replicas: int, timeout_seconds: float) -> AppStatus:
    """Wait until the app runs, with a progress bar of running out of desired instances on stderr."""
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("running"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=make_console(stderr=True)) as progress:
        task = progress.add_task(f"{name} deploying", total=max(replicas, 1))

        def show_status(status: AppStatus) -> None:
            progress.update(task, total=max(status.replicas.desired, 1), completed=status.replicas.running,
                            description=f"{status.name} {status.status}")

        return client.apps.wait_until_running(app_id, timeout=timeout_seconds, on_progress=show_status)


@app.command("list")
@click.option("--status", type=click.Choice(APP_STATUSES), help="Only apps with this status.")
@click.option("--node-id", help="Only apps with an instance on this node.")
@click.option("--limit", type=int, default=DEFAULT_LIST_LIMIT, show_default=True, help="Apps per page.")
@click.option("--offset", type=int, default=0, show_default=True, help="Apps to skip.")
@json_option
@click.pass_context
def app_list(ctx: click.Context, status: str | None, node_id: str | None, limit: int, offset: int,
             as_json: bool) -> None:
    """List the apps of the network, one page at a time."""
    page = client_of(ctx).apps.list(status=status, node_id=node_id, limit=limit, offset=offset)
    if as_json:
        print_json(page.to_dict())
        return

    console = make_console()
    table = new_table("APP ID", "NAME", "STATUS", "RUNNING", "HEALTHY", "NODES", "UPDATED", wrap=("NODES",))
    for summary in page.apps:
        counts = summary.replicas
        add_row(table, summary.id, summary.name, summary.status, f"{counts.running}/{counts.desired}",
                counts.healthy, summary.nodes, summary.last_updated)
    show(console, table)
    shown_last = page.offset + len(page.apps)
    summary_line = f"{len(page.apps)} of {page.total_count} apps"
    if page.has_more:
        summary_line += f"; the next page: --offset {shown_last}"
    show(console, Text(summary_line))


@app.command("status")
@click.option("--app-id", required=True, help="App id, as deploy and list print it.")
@json_option
@click.pass_context
def app_status(ctx: click.Context, app_id: str, as_json: bool) -> None:
    """Show one app: status, replica counts and every instance."""
    status = client_of(ctx).apps.get_status(app_id)
    if as_json:
        print_json(status.to_dict())
    else:
        print_app_status(status)


def print_app_status(status: AppStatus) -> None:
    console = make_console()
    counts = status.replicas
    rows = [
        ("app id", status.id),
        ("name", status.name),
        ("image", status.image),
        ("status", status.status),
        ("health", status.health),
        ("replicas", (f"{counts.desired} desired, {counts.running} running, "
                      f"{counts.healthy} healthy, {counts.unhealthy} unhealthy")),
        ("updated", status.last_updated),
    ]
    if status.last_error:
        rows.append(("last error", status.last_error.get("message", status.last_error)))
    print_fields(console, rows)
    if not status.instances:
        return

    click.echo()
    table = new_table("INSTANCE", "NODE", "STATUS", "HEALTH", "PORTS", "CPU %", "MEMORY MB", "STARTED",
                      wrap=("PORTS",))
    for instance in status.instances:
        usage = instance.resource_usage
        add_row(table, instance.id, instance.node_id, instance.status, instance.health,
                [format_port(port) for port in instance.ports], usage.cpu_percent, usage.memory_mb,
                instance.started_at)
    show(console, table)


def format_port(port: PublishedPort) -> str:
    """Format a published port as HOST_IP:HOST_PORT->CONTAINER_PORT/PROTOCOL."""
    target = f"{port.container_port}/{port.protocol}"
    if port.host_port is None:
        return target
    return f"{port.host_ip}:{port.host_port}->{target}"


@app.command("scale")
@click.option("--app-id", required=True, help="App id, as deploy and list print it.")
@click.option("--replicas", type=int, required=True, help="New number of instances; 0 keeps the app with none.")
@json_option
@click.pass_context
def app_scale(ctx: click.Context, app_id: str, replicas: int, as_json: bool) -> None:
    """Change the number of instances of an app."""
    result = client_of(ctx).apps.scale(app_id, replicas)
    if as_json:
        print_json(result.to_dict())
        return
    print_fields(make_console(), [
        ("app id", result.app_id),
        ("replicas", f"{result.previous_replicas} -> {result.new_replicas}"),
        ("scaling", result.scaling_status),
        ("message", result.message),
    ])


@app.command("stop")
@click.option("--app-id", required=True, help="App id, as deploy and list print it.")
@click.option("--force", is_flag=True, help="Kill the containers at once instead of SIGTERM, then SIGKILL after 10 s.")
@json_option
@click.pass_context
def app_stop(ctx: click.Context, app_id: str, force: bool, as_json: bool) -> None:
    """Stop an app and remove its containers; it stays in the list as stopped."""
    result = client_of(ctx).apps.stop(app_id, force=force)
    if as_json:
        print_json(result.to_dict())
        return
    print_fields(make_console(), [
        ("app id", result.app_id),
        ("instances stopped", result.instances_stopped),
        ("message", result.message),
    ])


@app.command("logs")
@click.option("--app-id", required=True, help="App id, as deploy and list print it.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until Ctrl-C.")
@click.option("--tail", type=click.IntRange(min=0, max=MAX_LOG_TAIL_LINES), default=DEFAULT_LOG_TAIL_LINES,
              show_default=True,
              help="Lines of history to print first, per instance.")
@json_option
@click.pass_context
def app_logs(ctx: click.Context, app_id: str, follow: bool, tail: int, as_json: bool) -> None:
    """Print the log lines of every instance as: timestamp node instance level message."""
    entries = client_of(ctx).apps.logs(app_id, follow=follow, tail=tail)
    print_stream(entries, print_json_line_of if as_json else print_log_entry)


def print_json_line_of(item: Any) -> None:
    print_json_line(item.to_dict())


def print_log_entry(entry: LogEntry) -> None:
    timestamp = format_time(entry.timestamp, milliseconds=True)
    click.echo(f"{timestamp} {entry.node_id} {entry.instance_id} {entry.level} {entry.message.rstrip()}")


@cli.group()
def data() -> None:
    """Store and read JSON values in the network."""


@data.command("put")
@click.argument("key")
@click.argument("value")
@click.option("--ttl", type=int, metavar="SECONDS", help="Seconds until the value expires. [default: the node's, 3600]")
@click.option("--replicas", type=int, help="Copies to keep in the network. [default: the node's, 3]")
@json_option
@click.pass_context
def data_put(ctx: click.Context, key: str, value: str, ttl: int | None, replicas: int | None, as_json: bool) -> None:
    """Store VALUE under KEY. VALUE is read as JSON, else stored as a string."""
    result = client_of(ctx).data.store(key, parse_data_value(value), ttl=ttl, replicas=replicas)
    if as_json:
        print_json(result.to_dict())
        return
    print_fields(make_console(), [
        ("key", result.key),
        ("stored on", result.storage_nodes),
        ("expires", result.expires_at),
    ])
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)


@data.command("get")
@click.argument("key")
@json_option
@click.pass_context
def data_get(ctx: click.Context, key: str, as_json: bool) -> None:
    """Print the value stored under KEY as JSON; --json adds its metadata."""
    result = client_of(ctx).data.retrieve(key)
    if as_json:
        print_json(result.to_dict())
    else:
        print_json(result.value)


@cli.command("nodes")
@click.option("--status", type=click.Choice(NODE_STATUSES), help="Only nodes with this membership status.")
@click.option("--capability", help="Only nodes that offer this capability, such as app-deployment.")
@json_option
@click.pass_context
def nodes(ctx: click.Context, status: str | None, capability: str | None, as_json: bool) -> None:
    """List the nodes that the node you talk to knows of, with their load."""
    result = client_of(ctx).nodes.discover(status=status, capability=capability)
    if as_json:
        print_json(result.to_dict())
        return

    console = make_console()
    table = new_table("NODE", "ADDRESS", "STATUS", "CPU %", "MEMORY %", "APPS", "CAPABILITIES", "LAST SEEN",
                      wrap=("CAPABILITIES",))
    for node in result.nodes:
        load = node.load or {}
        add_row(table, node.id, node.address, node.status, load.get("cpu_percent"), load.get("memory_percent"),
                load.get("active_apps"), node.capabilities, node.last_seen)
    show(console, table)
    show(console, Text(f"{result.total_nodes} nodes, {result.online_nodes} online"))


@cli.command("health")
@json_option
@click.pass_context
def health(ctx: click.Context, as_json: bool) -> None:
    """Show the health of the node and its components; exit 1 when it is unhealthy."""
    # NOTE: a node reports "unhealthy" with HTTP 503, which the client raises as
    # ServiceUnavailable without the body, so that case prints an error line, not the table.
    result = client_of(ctx).status.health()
    if as_json:
        print_json(result.to_dict())
    else:
        console = make_console()
        print_fields(console, [
            ("status", result.status),
            ("version", result.version),
            ("uptime", f"{result.uptime_seconds} s"),
        ])
        table = new_table("COMPONENT", "STATUS")
        for component, state in result.components.items():
            add_row(table, component, state)
        show(console, table)
    if result.status == "unhealthy":
        ctx.exit(ExitStatus.API_ERROR)


@cli.command("version")
@json_option
@click.pass_context
def version(ctx: click.Context, as_json: bool) -> None:
    """Show the node's version, build and enabled features."""
    result = client_of(ctx).info.version()
    if as_json:
        print_json(result.to_dict())
        return
    enabled = [name for name, on in result.features.items() if on]
    print_fields(make_console(), [
        ("version", result.version),
        ("build date", result.build_date),
        ("git commit", result.git_commit),
        ("environment", result.build_environment),
        ("features", enabled),
    ])


@cli.command("events")
@click.option("--types", callback=parse_event_types, metavar="TYPE[,TYPE...]",
              help="Only these event types, such as node_joined,node_left,app_deployed,app_failed.")
@click.option("--since", metavar="EVENT_ID", help="First replay the node's buffered events after this one.")
@json_option
@click.pass_context
def events(ctx: click.Context, types: list[str] | None, since: str | None, as_json: bool) -> None:
    """Print network events as they happen, one line each, until Ctrl-C."""
    stream = client_of(ctx).events(types=types, since=since)
    print_stream(stream, print_json_line_of if as_json else print_event)


def print_event(event: Event) -> None:
    subject = json.dumps(event.subject, separators=(",", ":"), ensure_ascii=False)
    payload = json.dumps(event.data, separators=(",", ":"), ensure_ascii=False)
    click.echo(f"{format_time(event.timestamp, milliseconds=True)} {event.type} {event.source_node_id} "
               f"subject={subject} data={payload}")


@cli.command("completion")
@click.argument("shell", type=click.Choice(COMPLETION_SHELLS))
def completion(shell: str) -> None:
    """Print the completion script for SHELL.

    \b
    bash: eval "$(voxa-cli completion bash)"   in ~/.bashrc
    zsh:  eval "$(voxa-cli completion zsh)"    in ~/.zshrc
    """
    completion_class = get_completion_class(shell)
    # The same bytes as `_VOXA_CLI_COMPLETE=bash_source voxa-cli` prints.
    click.echo(completion_class(cli, {}, PROG_NAME, COMPLETE_VARIABLE).source(), nl=False)


# --- errors and the entry point ----------------------------------------------------------


def one_line(text: str) -> str:
    return " ".join(str(text).split())


# Hints that depend only on the kind of error; the first matching class wins, so a
# subclass comes before its base class.
FIXED_HINTS: tuple[tuple[type[errors.VoxaError], str], ...] = (
    (errors.RequestTimeout, "raise --timeout or VOXA_TIMEOUT, or check that the node is not overloaded"),
    (errors.NetworkError, "set the node's address with --url or VOXA_URL"),
    (errors.AuthenticationRequired,
     "pass a token with --token or VOXA_TOKEN"),
    (errors.AuthorizationFailed, "use a token with a higher scope, such as 'voxanode token create --scope write'"),
    (errors.Conflict, "check 'voxa-cli app list' and retry once the other change is done"),
)


def app_hint(app_id: str) -> str:
    return f"see 'voxa-cli app status --app-id {app_id}' and 'voxa-cli app logs --app-id {app_id}'"


def error_hint(exc: errors.VoxaError) -> str:
    """Return what the user can do about `exc`."""
    for error_class, hint in FIXED_HINTS:
        if isinstance(exc, error_class):
            return hint

    details = exc.details or {}
    if isinstance(exc, errors.NotFound):
        if "app_id" in details:
            return "'voxa-cli app list' shows the app ids"
        if "key" in details:
            return "check the key; a value is gone once its ttl has passed"
        return "check the id or key"
    if isinstance(exc, errors.InvalidRequest):
        return f"fix {exc.field} and retry" if exc.field else "fix the request and retry"

    if isinstance(exc, (errors.RateLimited, errors.ServiceUnavailable)):
        wait = f"in {exc.retry_after:g} s" if exc.retry_after else "later"
        return f"retry {wait}, or send the request to another node with --url"

    if isinstance(exc, errors.DeploymentFailed):
        if "app_id" in details:
            return app_hint(details["app_id"])
        return "check that the image exists on the nodes and that the resources fit a node"
    if isinstance(exc, errors.WaitTimeout):
        app_id = getattr(exc.last_status, "id", None)
        if app_id:
            return f"{app_hint(app_id)}, and raise --timeout if it is still deploying"
        return "raise --timeout if the app is still deploying"

    if exc.request_id:
        return f"the node's log has the details under request id {exc.request_id}"
    return "the node's log may have the details"


def describe_error(exc: errors.VoxaError) -> str:
    """Return the one-line report of a client error: CODE: message (field: X) - hint."""
    message = one_line(exc.message or str(exc))
    url = getattr(exc, "url", None)
    if isinstance(exc, errors.NetworkError) and url and "://" not in message:
        message = f"cannot reach {url}: {message}"
    field_name = (exc.details or {}).get("field")
    if field_name:
        message += f" (field: {field_name})"
    return f"{exc.code or 'ERROR'}: {message} - {error_hint(exc)}"


def report_error(line: str) -> None:
    click.echo(f"error: {line}", err=True)


def run(argv: Sequence[str] | None = None) -> int:
    """Run voxa-cli with `argv` (default: sys.argv[1:]); return the exit status."""
    try:
        result = cli.main(args=argv, prog_name=PROG_NAME, complete_var=COMPLETE_VARIABLE, standalone_mode=False)
    except NO_ARGS_IS_HELP_ERROR as exc:
        exc.show()
        return exc.exit_code
    except click.UsageError as exc:
        command_path = exc.ctx.command_path if exc.ctx else PROG_NAME
        report_error(f"USAGE_ERROR: {one_line(exc.format_message()).rstrip('.')} "
                     f"- run '{command_path} --help' for the options")
        return exc.exit_code
    except click.ClickException as exc:
        report_error(f"ERROR: {one_line(exc.format_message())}")
        return exc.exit_code
    except click.Abort:
        report_error("INTERRUPTED: stopped by Ctrl-C")
        return ExitStatus.INTERRUPTED
    except ConfigError as exc:
        report_error(f"CONFIG_INVALID: {exc.path}: {one_line(exc.message)} - {exc.hint}")
        return ExitStatus.USAGE_ERROR
    except errors.NetworkError as exc:
        report_error(describe_error(exc))
        return ExitStatus.CONNECTION_FAILED
    except errors.VoxaError as exc:
        report_error(describe_error(exc))
        return ExitStatus.API_ERROR
    except BrokenPipeError:
        # The reader of stdout went away (such as `| head`): stop quietly. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitStatus.OK
    return result if isinstance(result, int) else ExitStatus.OK


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console script entry point: run voxa-cli and exit with its status."""
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
