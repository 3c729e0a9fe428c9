"""The `voxanode` command: flags, settings, data directory, logging, node key, then the node.

`main` is the only place that decides the exit status. Each expected failure (a bad
setting, an unusable data directory or node key, a port that cannot be bound) becomes
one line `voxanode: error: ...` on stderr and exit status 2.
"""

import argparse
import asyncio
import dataclasses
import errno
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
    BindError,
    BooleanRule,
    PeerListRule,
    Settings,
    SettingsError,
    format_peer_address,
    load_settings,
    resolve_git_commit,
)

PROGRAM_NAME = "voxanode"
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
BIND_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL})

DESCRIPTION = (
    "Run a voxanode peer: a Kademlia DHT node with a REST API."
)
EPILOG = (
    "Each setting comes from its default, then the JSON settings file, then its VOXA_* "
    "environment variable, then its flag; a later source wins. Relative paths are "
    "resolved against the current directory."
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
    """Run the daemon until it stops and return the process exit status."""
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
        # TODO(bearer token authentication): remove once the API checks tokens.
        logger.warning(
            "API token authentication is not implemented in this version, so every client"
            " that reaches %s has full access; keep api_host on a trusted interface",
            format_peer_address(settings.api_host, settings.api_port),
        )
    return _run_node(settings, identity)


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
