"""The `voxanode` command: flags, settings, data directory, logging, node key, then the node.

`main` is the only place that decides the exit status. Each expected failure (a bad
setting, an unusable data directory, token file or node key, a port that cannot be
bound) becomes one line `voxanode: error: ...` on stderr and exit status 2.

`voxanode token create|list|revoke` manages the API tokens in the token file of the
data directory, which it finds the same way as the daemon. It exits 0 on success, 2
on a usage error (an invalid scope or name, an unknown token) and 1 on any other
failure, with one line on stderr.
"""

import argparse
import asyncio
import dataclasses
import errno
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

from voxanode import __version__
from voxanode.identity import Identity, IdentityError
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
    "`voxanode token create|list|revoke`; see `voxanode token --help`."
)
TOKEN_DESCRIPTION = (
    "Create, list and revoke the bearer tokens of the REST API. They live in tokens.json "
    "in the node's data directory, which is found as the daemon finds it. A running node "
    "reads changes at its next request."
)

logger = logging.getLogger(__name__)


class _OneLineArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    """Return the parser with one flag per setting. Flags the user omits stay unset."""
    parser = _OneLineArgumentParser(
        prog=PROGRAM_NAME,
        description=DESCRIPTION,
        epilog=EPILOG,
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

    parser = build_parser()
    try:
        namespace = parser.parse_args(argv)
    except SystemExit as exit_request:
        # --help and --version print and exit 0. Usage errors exit 2.
        return _exit_status(exit_request)

    # Settings and the data directory are checked before anything is logged.
    try:
        settings = load_settings(vars(namespace), os.environ, Path.cwd())
        _prepare_data_dir(settings)
    except SettingsError as error:
        return _report_error(str(error))

    configure_logging(settings.log_level)
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
    return _run_node(settings, identity)


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
        "revoke", help="revoke a token; a running node rejects it from its next request on"
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


def token_main(argv: list[str]) -> int:
    """Run `voxanode token ARGS` and return its exit status."""
    parser = build_token_parser()
    try:
        namespace = parser.parse_args(argv)
    except SystemExit as exit_request:
        return _exit_status(exit_request)

    options = vars(namespace)
    flags = {name: options[name] for name in ("data_dir", "config_file") if name in options}
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


def _run_node(settings: Settings, identity: Identity) -> int:
    # Imported here so that settings errors are reported without loading the network stack.
    from voxanode.node import Node

    try:
        asyncio.run(Node(settings, identity).run_until_stopped())
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
