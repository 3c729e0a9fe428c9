"""The `voxanode` command: flags, settings, data directory, logging, node key, then the node.

`main` is the only place that decides the exit status. Each expected failure (a bad
setting, an unusable data directory, token file or node key, a port that cannot be
bound) becomes one line `voxanode: error: ...` on stderr and exit status 2.

`voxanode token create|list|revoke` manages the API tokens in the token file of the
data directory, which it finds the same way as the daemon. It exits 0 on success, 2
on a usage error (an invalid scope or name, an unknown token) and 1 on any other
failure, with one line on stderr.

`voxanode check-config` reads the settings as the daemon would and checks the files
the node would open; `voxanode keygen` creates the node key and `voxanode identity`
shows it. They exit 0 when all is well and 2 with the reasons otherwise.
"""

import argparse
import asyncio
import dataclasses
import errno
import json
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn

from voxanode import __version__
from voxanode.identity import KEY_FILE_NAME, Identity, IdentityError
from voxanode.logs import configure_logging, set_node_id
from voxanode.settings import (
    SETTING_SPECS,
    SPECS_BY_NAME,
    BindError,
    BooleanRule,
    PeerListRule,
    Settings,
    SettingsError,
    format_peer_address,
    load_settings,
    resolve_git_commit,
)
from voxanode.tokens import (
    SCOPE_NAMES,
    Scope,
    TokenFileError,
    TokenUsageError,
    create_token,
    parse_scope,
    read_token_file,
    revoke_token,
    token_file_path,
)

PROGRAM_NAME = "voxanode"
TOKEN_PROGRAM_NAME = "voxanode token"
TOKEN_COMMAND = "token"
CHECK_CONFIG_COMMAND = "check-config"
KEYGEN_COMMAND = "keygen"
IDENTITY_COMMAND = "identity"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
BIND_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL})

DESCRIPTION = (
    "Run a voxanode peer: a Kademlia DHT node with a REST API."
)
EPILOG = (
    "Each setting comes from its default, then the JSON settings file, then its VOXA_* "
    "environment variable, then its flag; a later source wins. Relative paths are "
    "resolved against the current directory. Manage API tokens with "
    "`voxanode token create|list|revoke`; see `voxanode token --help`. "
    "`voxanode check-config` checks the settings without starting; `voxanode keygen` "
    "creates the node key and `voxanode identity` shows it. SIGHUP reloads the bootstrap "
    "peers, the tokens and the settings that can change while running."
)
TOKEN_DESCRIPTION = (
    "Create, list and revoke the bearer tokens of the REST API. They live in tokens.json "
    "in the node's data directory, which is found as the daemon finds it. A running node "
    "reads changes within a second."
)

logger = logging.getLogger(__name__)


class _OneLineArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser(
    prog: str = PROGRAM_NAME, description: str = DESCRIPTION, epilog: str | None = EPILOG
) -> argparse.ArgumentParser:
    """Return the parser with one flag per setting. Flags the user omits stay unset."""
    parser = _OneLineArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--version", action="version", version=f"{PROGRAM_NAME} {__version__}")

    groups: dict[str, argparse._ArgumentGroup] = {}
    for spec in SETTING_SPECS:
        if spec.group not in groups:
            groups[spec.group] = parser.add_argument_group(spec.group)
        group = groups[spec.group]
        help_text = f"{spec.help} [default: {spec.default_text}; env {spec.env}]"
        # argparse expands %-placeholders in help texts, so a literal % is doubled.
        options: dict[str, object] = {"dest": spec.name, "help": help_text.replace("%", "%%")}
        if isinstance(spec.rule, BooleanRule):
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["metavar"] = spec.rule.metavar
        if isinstance(spec.rule, PeerListRule):
            options["action"] = "append"
        group.add_argument(spec.flag, **options)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the daemon until it stops, or a `token` command, and return the exit status."""
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == [TOKEN_COMMAND]:
        return token_main(argv[1:])
    if argv[:1] == [CHECK_CONFIG_COMMAND]:
        return check_config_main(argv[1:])
    if argv[:1] in ([KEYGEN_COMMAND], [IDENTITY_COMMAND]):
        return identity_main(argv[0], argv[1:])

    parser = build_parser()
    try:
        namespace = parser.parse_args(argv)
    except SystemExit as exit_request:
        # --help and --version print and exit 0. Usage errors exit 2.
        return _exit_status(exit_request)

    # SIGHUP would end the process until the node installs its reload handler.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Settings and the data directory are checked before anything is logged.
    flags = vars(namespace)
    cwd = Path.cwd()
    try:
        settings = load_settings(flags, os.environ, cwd)
        _prepare_data_dir(settings)
    except SettingsError as error:
        return _report_error(str(error))

    configure_logging(settings.log_level, log_format=settings.log_format)
    if settings.git_commit is None:
        settings = dataclasses.replace(settings, git_commit=resolve_git_commit(os.environ))

    try:
        identity = Identity.load_or_create(settings.data_dir)
    except (IdentityError, OSError) as error:
        source = settings.source_of("data_dir")
        fix = f"restore the key file, or set data_dir (from {source}) to another directory"
        return _report_error(f"{error}; {fix}")
    set_node_id(identity.node_id)

    logger.info(
        "starting voxanode version=%s git_commit=%s data_dir=%s",
        __version__,
        settings.git_commit,
        settings.data_dir,
    )
    if settings.dev:
        logger.warning(
            "dev mode: API authentication is off, so every client that reaches %s has full access",
            format_peer_address(settings.api_host, settings.api_port),
        )
    else:
        try:
            _log_token_count(settings)
        except TokenFileError as error:
            return _report_error(f"{error}; fix the file, or move it away and create new tokens")
    return _run_node(settings, identity, lambda: load_settings(flags, os.environ, cwd))


def build_token_parser() -> argparse.ArgumentParser:
    """Return the parser of `voxanode token` and its create, list and revoke commands."""
    parser = _OneLineArgumentParser(prog=TOKEN_PROGRAM_NAME, description=TOKEN_DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{create,list,revoke}")

    create = commands.add_parser(
        "create",
        help="create a token and print it once, as the last line of stdout",
        description="Create a token and print it once, as the last line of stdout. Only its "
        "SHA-256 is stored, so a lost token cannot be shown again: revoke it and create another.",
    )
    create.add_argument(
        "--scope",
        required=True,
        choices=SCOPE_NAMES,
        help="read: GET and HEAD requests, websockets included; write: every method; "
        "admin: what write may do, and routes that need admin",
    )
    create.add_argument(
        "--name", required=True, help="a unique label for the token, such as the client that uses it"
    )

    list_command = commands.add_parser(
        "list", help="list the tokens: id, name, scope, created, revoked (never the token)"
    )
    list_command.add_argument("--json", action="store_true", help="print a JSON list instead of a table")

    revoke = commands.add_parser(
        "revoke", help="revoke a token; a running node rejects it within a second"
    )
    revoke.add_argument("token", metavar="ID_OR_NAME", help="the token's id (tok-...) or its name")

    for command in (create, list_command, revoke):
        _add_data_dir_options(command)
    return parser


def _add_data_dir_options(parser: argparse.ArgumentParser) -> None:
    """Add --data-dir and --config, with the daemon's help texts, defaults and variables."""
    for name in ("data_dir", "config_file"):
        spec = SPECS_BY_NAME[name]
        help_text = f"{spec.help} [default: {spec.default_text}; env {spec.env}]"
        parser.add_argument(
            spec.flag,
            dest=name,
            metavar=spec.rule.metavar,
            default=argparse.SUPPRESS,
            help=help_text.replace("%", "%%"),
        )


def _data_dir_flags(namespace: argparse.Namespace) -> dict[str, object]:
    """Return the --data-dir and --config values the user gave, for load_settings."""
    options = vars(namespace)
    return {name: options[name] for name in ("data_dir", "config_file") if name in options}


def token_main(argv: list[str]) -> int:
    """Run `voxanode token ARGS` and return its exit status."""
    parser = build_token_parser()
    try:
        namespace = parser.parse_args(argv)
    except SystemExit as exit_request:
        return _exit_status(exit_request)

    flags = _data_dir_flags(namespace)
    try:
        settings = load_settings(flags, os.environ, Path.cwd())
        path = token_file_path(settings.data_dir)
        if namespace.command == "create":
            return _create_token_command(settings, path, namespace.name, parse_scope(namespace.scope))
        if namespace.command == "list":
            return _list_tokens_command(path, namespace.json)
        return _revoke_token_command(path, namespace.token)
    except (SettingsError, TokenUsageError) as error:
        return _report_token_error(str(error), EXIT_USAGE)
    except TokenFileError as error:
        return _report_token_error(str(error), EXIT_FAILURE)


def _create_token_command(settings: Settings, path: Path, name: str, scope: Scope) -> int:
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror or str(error)
        raise TokenFileError(f"cannot create the data directory {settings.data_dir}: {reason}") from None
    token, record = create_token(path, name, scope)
    print(
        f"created token {record.id} (name {record.name}, scope {record.scope}) in {path}."
        " It is printed once, on the next line of stdout; store it now.",
        file=sys.stderr,
    )
    print(token, flush=True)
    return EXIT_OK


def _list_tokens_command(path: Path, as_json: bool) -> int:
    records = read_token_file(path)
    if as_json:
        print(json.dumps([record.describe() for record in records], indent=2))
        return EXIT_OK
    if not records:
        print(f"no tokens in {path}; create one with `voxanode token create`", file=sys.stderr)
        return EXIT_OK
    rows = [["ID", "NAME", "SCOPE", "CREATED", "REVOKED"]]
    for record in records:
        rows.append([record.id, record.name, record.scope, record.created_at, record.revoked_at or "-"])
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return EXIT_OK


def _revoke_token_command(path: Path, id_or_name: str) -> int:
    record, revoked_now = revoke_token(path, id_or_name)
    if revoked_now:
        print(f"revoked token {record.id} (name {record.name}, scope {record.scope})")
    else:
        print(f"token {record.id} (name {record.name}) was already revoked at {record.revoked_at}")
    return EXIT_OK


def _report_token_error(message: str, status: int) -> int:
    one_line = " ".join(message.splitlines())
    print(f"{TOKEN_PROGRAM_NAME}: error: {one_line}", file=sys.stderr)
    return status


def _log_token_count(settings: Settings) -> None:
    """Log how many API tokens are active, with a warning when there are none."""
    path = token_file_path(settings.data_dir)
    active = sum(1 for record in read_token_file(path) if record.active)
    if active:
        logger.info("API authentication is on: %d active tokens in %s", active, path)
        return
    logger.warning(
        "API authentication is on, but %s has no active token, so every request except"
        " GET /status/health is rejected; create one with"
        " `voxanode token create --scope admin --name NAME --data-dir %s`",
        path,
        settings.data_dir,
    )


CHECK_CONFIG_DESCRIPTION = (
    "Read the settings as `voxanode` would with the same flags, environment and files "
    "(settings file, bootstrap peers file), and check the data directory, the node key "
    "and the token file if they exist. Changes nothing. Exits 0 when the node could "
    "start with them, 2 with one line per problem otherwise."
)


def check_config_main(argv: list[str]) -> int:
    """Run `voxanode check-config FLAGS` and return its exit status."""
    prog = f"{PROGRAM_NAME} {CHECK_CONFIG_COMMAND}"
    parser = build_parser(prog, CHECK_CONFIG_DESCRIPTION, None)
    try:
        namespace = parser.parse_args(argv)
    except SystemExit as exit_request:
        return _exit_status(exit_request)
    try:
        settings = load_settings(vars(namespace), os.environ, Path.cwd())
    except SettingsError as error:
        return _report_problems(prog, [str(error)])

    report: list[str] = [f"settings file: {settings.config_file or 'none, defaults and flags only'}"]
    peers_from = settings.bootstrap_file or "flags and environment"
    report.append(f"bootstrap peers: {len(settings.bootstrap_peers)} (from {peers_from})")
    problems: list[str] = []
    for check in (_check_data_dir, _check_node_key, _check_token_file):
        line, problem = check(settings)
        if line:
            report.append(line)
        if problem:
            problems.append(problem)
    if problems:
        return _report_problems(prog, problems)
    for line in report:
        print(line)
    print("configuration is valid")
    return EXIT_OK


def _check_data_dir(settings: Settings) -> tuple[str | None, str | None]:
    directory = settings.data_dir
    existing = directory
    try:
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
    except OSError as error:
        return None, f"data_dir {directory}: {error.strerror or error}"
    if not existing.is_dir():
        return None, f"data_dir {directory}: {existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return None, f"data_dir {directory}: {existing} is not writable by this user"
    if existing == directory:
        return f"data directory: {directory} (exists, writable)", None
    return f"data directory: {directory} (will be created in {existing})", None


def _check_node_key(settings: Settings) -> tuple[str | None, str | None]:
    path = settings.data_dir / KEY_FILE_NAME
    try:
        if not path.exists():
            return "node key: none yet, created on first start", None
        identity = Identity.load(settings.data_dir)
    except IdentityError as error:
        return None, str(error)
    except OSError as error:
        return None, f"cannot read node key {path}: {error.strerror or error}; run as the node's user"
    return f"node key: {identity.node_id}", None


def _check_token_file(settings: Settings) -> tuple[str | None, str | None]:
    path = token_file_path(settings.data_dir)
    try:
        records = read_token_file(path) if path.exists() else []
    except TokenFileError as error:
        return None, str(error)
    except OSError as error:
        return None, f"cannot read the token file {path}: {error.strerror or error}; run as the node's user"
    active = sum(1 for record in records if record.active)
    line = f"tokens: {active} active of {len(records)} in {path}"
    if settings.dev:
        line += " (dev mode: authentication is off)"
    elif not active:
        line += (
            "; warning: every request except GET /status/health will be rejected until"
            " you create one with `voxanode token create`"
        )
    return line, None


def _report_problems(prog: str, problems: list[str]) -> int:
    for problem in problems:
        one_line = " ".join(problem.splitlines())
        print(f"{prog}: error: {one_line}", file=sys.stderr)
    return EXIT_USAGE


def build_identity_parser(command: str) -> argparse.ArgumentParser:
    """Return the parser of `voxanode keygen` or `voxanode identity`."""
    if command == KEYGEN_COMMAND:
        description = (
            "Create the node key (Ed25519, mode 0600) in the data directory and print the "
            "node id and public key. An existing key is never replaced."
        )
    else:
        description = "Print the node id, public key and DHT id of the node key in the data directory."
    parser = _OneLineArgumentParser(prog=f"{PROGRAM_NAME} {command}", description=description)
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of lines")
    _add_data_dir_options(parser)
    return parser


def identity_main(command: str, argv: list[str]) -> int:
    """Run `voxanode keygen` or `voxanode identity` and return the exit status."""
    prog = f"{PROGRAM_NAME} {command}"
    parser = build_identity_parser(command)
    try:
        namespace = parser.parse_args(argv)
    except SystemExit as exit_request:
        return _exit_status(exit_request)
    flags = _data_dir_flags(namespace)
    try:
        settings = load_settings(flags, os.environ, Path.cwd())
    except SettingsError as error:
        return _report_problems(prog, [str(error)])

    key_path = settings.data_dir / KEY_FILE_NAME
    try:
        if command == KEYGEN_COMMAND:
            identity = Identity.create(settings.data_dir)
        else:
            identity = Identity.load(settings.data_dir)
    except IdentityError as error:
        if command == KEYGEN_COMMAND:
            fix = "remove or move it first; the network then sees this node as a new one"
        else:
            fix = f"start the node once or run `{PROGRAM_NAME} {KEYGEN_COMMAND}`"
        return _report_problems(prog, [f"{error}; {fix}"])
    except OSError as error:
        return _report_problems(prog, [f"cannot use {key_path}: {error.strerror or error}"])

    description = {
        "node_id": identity.node_id,
        "public_key": identity.public_key.hex(),
        "dht_id": identity.dht_id.hex(),
        "key_file": str(key_path),
    }
    if namespace.json:
        print(json.dumps(description, indent=2))
    else:
        for name, value in description.items():
            print(f"{name}: {value}")
    return EXIT_OK


def _exit_status(exit_request: SystemExit) -> int:
    if exit_request.code is None:
        return EXIT_OK
    if isinstance(exit_request.code, int):
        return exit_request.code
    return EXIT_USAGE


def _report_error(message: str) -> int:
    one_line = " ".join(message.splitlines())
    print(f"{PROGRAM_NAME}: error: {one_line}", file=sys.stderr)
    return EXIT_USAGE


def _prepare_data_dir(settings: Settings) -> None:
    """Create the data directory and check that a file can be written in it."""
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=settings.data_dir):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        problem = f"cannot create or write the directory ({reason}); choose a writable directory"
        source = settings.source_of("data_dir")
        raise SettingsError.for_value("data_dir", settings.data_dir, source, problem) from None


def _event_loop_runner(name: str) -> Callable[[Coroutine[Any, Any, None]], None]:
    """Return the function that runs the node's main coroutine on the `event_loop` setting's loop."""
    if name == "uvloop":
        import uvloop

        return uvloop.run
    return asyncio.run


def _run_node(settings: Settings, identity: Identity, settings_loader: Callable[[], Settings]) -> int:
    # Imported here so that settings errors are reported without loading the network stack.
    from voxanode.node import Node
    from voxanode.notify import ServiceNotifier

    node = Node(settings, identity, settings_loader=settings_loader, notifier=ServiceNotifier())
    try:
        _event_loop_runner(settings.event_loop)(node.run_until_stopped())
    except BindError as error:
        return _report_error(_describe_bind_error(error, settings))
    except OSError as error:
        if error.errno not in BIND_ERRNOS:
            raise
        api_address = format_peer_address(settings.api_host, settings.api_port)
        peer_address = format_peer_address(settings.peer_host, settings.peer_port)
        return _report_error(
            f"cannot bind a listening socket ({error.strerror}); check api_host and api_port "
            f"({api_address}) and peer_host and peer_port ({peer_address})"
        )
    except KeyboardInterrupt:
        logger.info("interrupted before the node installed its signal handlers")
        return EXIT_INTERRUPTED

    logger.info("voxanode stopped")
    return EXIT_OK


def _describe_bind_error(error: BindError, settings: Settings) -> str:
    """Return the one-line message for a socket the node could not bind."""
    host_setting = error.setting.replace("_port", "_host")
    address = format_peer_address(error.host, error.port)
    if error.errno == errno.EADDRNOTAVAIL:
        problem = (
            f"cannot listen on {address} ({error.strerror}); "
            f"set {host_setting} to an address of this machine"
        )
        source = settings.source_of(host_setting)
        return str(SettingsError.for_value(host_setting, error.host, source, problem))

    if error.errno == errno.EADDRINUSE:
        fix = f"stop the process that uses it or choose another {error.setting}"
    else:
        fix = f"check {host_setting} and {error.setting}"
    problem = f"cannot listen on {address} ({error.strerror}); {fix}"
    source = settings.source_of(error.setting)
    return str(SettingsError.for_value(error.setting, error.port, source, problem))


if __name__ == "__main__":
    sys.exit(main())
