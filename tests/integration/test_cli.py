"""voxa-cli run as a subprocess against real nodes and real containers of the test image.

Most tests share one two-node --dev network with Docker apps enabled, and run in file
order: read-only commands, data, then deploy, list, status, logs, scale and stop of one
app. The error tests use an address where nothing listens, a node started without --dev
(from devnet_factory), and no node at all for usage errors. Every container the shared
network made is removed at the end, found by its node id label.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import FAST_DAEMON_ARGS, TEST_IMAGE, api_get
from voxanode.devnet import Devnet, allocate_free_block
from voxanode.identity import Identity

REPO_DIR = Path(__file__).resolve().parents[2]
CLI_COMMAND = (sys.executable, "-m", "voxacommunications_client.cli")
TEST_IMAGE_START_LINE = "voxanode-test httpd starting on port 8080"
APP_ARGS = (
    "--apps-reconcile-interval-seconds", "1",
    "--apps-stats-interval-seconds", "2",
    "--apps-sync-interval-seconds", "3",
    "--apps-stop-timeout-seconds", "2",
)
SMALL_APP_ARGS = ("--memory", "64m", "--cpu", "0.2", "--port", "8080")
NODE_LABEL = "io.voxanode.node-id"
COMMAND_TIMEOUT_SECONDS = 60
SETTLE_SECONDS = 30
STREAM_LINE_SECONDS = 30
# `timestamp node instance level message`, as `app logs` prints each line.
LOG_LINE_PATTERN = re.compile(
    r"^(?P<timestamp>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (?P<node>node-[0-9a-f]+) "
    r"(?P<instance>\S+) (?P<level>\S+) (?P<message>.*)$"
)


# --- running the command --------------------------------------------------------------


def cli_environment(home: Path, **overrides: str) -> dict[str, str]:
    """The test process's environment without VOXA_* variables, with HOME pointed at `home`."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith("VOXA_")}
    environment.pop("COLUMNS", None)
    environment["HOME"] = str(home)
    environment["PYTHONPATH"] = str(REPO_DIR)
    environment.update(overrides)
    return environment


def run_cli(*args: str, home: Path, env: dict[str, str] | None = None,
            timeout: float = COMMAND_TIMEOUT_SECONDS) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI_COMMAND, *args],
        cwd=REPO_DIR,
        env=env or cli_environment(home),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def succeeded(completed: subprocess.CompletedProcess) -> str:
    """Return stdout after checking the exit status 0, showing stderr when it is not."""
    assert completed.returncode == 0, f"exit {completed.returncode}, stderr: {completed.stderr}"
    return completed.stdout


def json_output(completed: subprocess.CompletedProcess) -> Any:
    return json.loads(succeeded(completed))


def error_line(completed: subprocess.CompletedProcess) -> str:
    """Return the one stderr line of a failed command."""
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got: {completed.stderr!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert completed.stdout == ""
    return lines[0]


def wait_for(condition, timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    result = condition()
    while not result and time.monotonic() < deadline:
        time.sleep(interval)
        result = condition()
    return result


def read_line_within(process: subprocess.Popen, timeout: float) -> str:
    """Read one stdout line of a streaming command, failing the test when none comes in time."""
    deadline = time.monotonic() + timeout
    os.set_blocking(process.stdout.fileno(), False)
    buffer = ""
    while time.monotonic() < deadline:
        chunk = process.stdout.readline()
        if chunk:
            buffer += chunk
            if buffer.endswith("\n"):
                return buffer
        elif process.poll() is not None:
            break
        else:
            time.sleep(0.1)
    pytest.fail(f"no line within {timeout} s; exit {process.poll()}, partial {buffer!r}")


def default_ctrl_c() -> None:
    """Give the child the default SIGINT action, as a terminal would.

    A shell runs background jobs with SIGINT ignored, and a child inherits that, so a
    suite started in the background would otherwise test a CLI that cannot see Ctrl-C.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt(process: subprocess.Popen) -> tuple[int, str]:
    """Send SIGINT (Ctrl-C) to a streaming command; return its exit status and stderr."""
    process.send_signal(signal.SIGINT)
    returncode = process.wait(timeout=COMMAND_TIMEOUT_SECONDS)
    os.set_blocking(process.stderr.fileno(), True)
    return returncode, process.stderr.read()


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """An empty HOME, so no developer's ~/.config/voxa/config.toml is read."""
    return tmp_path_factory.mktemp("cli-home")


@pytest.fixture(scope="module")
def network(tmp_path_factory, test_image):
    block = allocate_free_block(3, random.Random())
    devnet = Devnet(
        2,
        tmp_path_factory.mktemp("cli-devnet"),
        first_address=block.first_address,
        api_port=block.api_port,
        peer_port=block.peer_port,
        extra_args=[*FAST_DAEMON_ARGS, *APP_ARGS],
    )
    devnet.start()
    node_ids = [node.fetch_node_id() for node in devnet.nodes]
    try:
        assert wait_for(lambda: all(offers_apps(node.api_url, node_ids) for node in devnet.nodes), SETTLE_SECONDS)
        yield devnet
    finally:
        devnet.stop()
        remove_containers(devnet)


def offers_apps(api_url: str, node_ids: list[str]) -> bool:
    status, body, _ = api_get(api_url, "/data/discover_nodes/", capability="app-deployment")
    return status == 200 and {node["node_id"] for node in body["nodes"]} >= set(node_ids)


def remove_containers(devnet: Devnet) -> None:
    for node in devnet.nodes:
        node_id = Identity.load_or_create(node.data_dir).node_id
        listed = subprocess.run(["docker", "ps", "-aq", "--filter", f"label={NODE_LABEL}={node_id}"],
                                capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS, check=False)
        if listed.stdout.split():
            subprocess.run(["docker", "rm", "-f", *listed.stdout.split()],
                           capture_output=True, timeout=COMMAND_TIMEOUT_SECONDS, check=False)


@pytest.fixture(scope="module")
def url(network) -> str:
    return network.nodes[0].api_url


@pytest.fixture(scope="module")
def deployed() -> dict[str, Any]:
    """The app that the deploy test creates, for the tests after it."""
    return {}


def need_app(deployed: dict[str, Any]) -> str:
    if "app_id" not in deployed:
        pytest.fail("the deploy test did not create the app this test uses")
    return deployed["app_id"]


# --- errors without a network -----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("app", "status"), "Missing option '--app-id'"),
        (("app", "deploy", "--name", "web", "--image", TEST_IMAGE, "--port", "http"), "'http' is not PORT"),
        (("app", "deploy", "--name", "web", "--image", TEST_IMAGE, "--env", "NOVALUE"), "'NOVALUE' is not KEY=VALUE"),
        (("app", "list", "--status", "sleeping"), "'sleeping' is not one of"),
        (("app", "scale", "--app-id", "app-1", "--replicas", "many"), "'many' is not a valid integer"),
        (("nodez",), "No such command 'nodez'"),
        (("--url", "127.0.0.1:9999", "health"), "the node URL must look like http://HOST:PORT"),
    ],
)
def test_cli_usage_error_exits_2(home, args, expected):
    completed = run_cli(*args, home=home)

    assert completed.returncode == 2
    line = error_line(completed)
    assert line.startswith("error: USAGE_ERROR: ")
    assert expected in line
    assert "--help' for the options" in line


def test_cli_unreachable_node_exits_3(home):
    block = allocate_free_block(1, random.Random())
    unreachable = f"http://{block.first_address}:{block.api_port}"

    completed = run_cli("--url", unreachable, "--timeout", "2", "health", home=home)

    assert completed.returncode == 3
    line = error_line(completed)
    assert line.startswith("error: NETWORK_ERROR: ")
    assert unreachable in line
    assert "--url or VOXA_URL" in line


def test_cli_invalid_config_file_exits_2(home, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('url = "http://127.0.0.1:9999"\ntokn = "x"\n', encoding="utf-8")

    completed = run_cli("health", home=home, env=cli_environment(home, VOXA_CLI_CONFIG=str(config)))

    assert completed.returncode == 2
    line = error_line(completed)
    assert line.startswith(f"error: CONFIG_INVALID: {config}: unknown key tokn")


def test_cli_completion_scripts(home):
    for shell in ("bash", "zsh"):
        printed = succeeded(run_cli("completion", shell, home=home))
        sourced = run_cli(home=home, env=cli_environment(home, _VOXA_CLI_COMPLETE=f"{shell}_source"))

        assert printed == succeeded(sourced)
        assert "_VOXA_CLI_COMPLETE" in printed
        assert "_voxa_cli_completion" in printed

    # The request that the bash script sends at a TAB after `voxa-cli app `.
    completed = run_cli(home=home, env=cli_environment(
        home, _VOXA_CLI_COMPLETE="bash_complete", COMP_WORDS="voxa-cli app ", COMP_CWORD="2"))
    offered = {line.split(",", 1)[1] for line in succeeded(completed).splitlines()}
    assert offered == {"deploy", "list", "status", "scale", "stop", "logs"}


# --- errors from a node -------------------------------------------------------------------


def test_cli_bad_token_exits_1(home, devnet_factory):
    devnet = devnet_factory(1, extra_args=["--no-dev"])
    node = devnet.nodes[0]
    bad_token = "voxa-not-a-real-token-3f9c"

    for env_token, flag_args in ((None, ("--token", bad_token)), (bad_token, ()), (None, ())):
        env = cli_environment(home, **({"VOXA_TOKEN": env_token} if env_token else {}))
        completed = run_cli("--url", node.api_url, *flag_args, "app", "list", home=home, env=env)

        assert completed.returncode == 1
        line = error_line(completed)
        assert line.startswith("error: AUTHENTICATION_REQUIRED: ")
        assert "--token or VOXA_TOKEN" in line
        assert "voxanode token create" in line
        assert bad_token not in line

    # A real token, from the config file, is accepted.
    created = subprocess.run(
        [sys.executable, "-m", "voxanode", "token", "create", "--scope", "read", "--name", "cli",
         "--data-dir", str(node.data_dir)],
        cwd=node.data_dir, env=cli_environment(home), capture_output=True, text=True,
        timeout=COMMAND_TIMEOUT_SECONDS, check=False,
    )
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip().splitlines()[-1]
    config = home / "token-config.toml"
    config.write_text(f'url = "{node.api_url}"\ntoken = "{token}"\n', encoding="utf-8")
    config.chmod(0o644)
    readable = run_cli("app", "list", "--json", home=home, env=cli_environment(home, VOXA_CLI_CONFIG=str(config)))
    config.chmod(0o600)
    listed = run_cli("app", "list", "--json", home=home, env=cli_environment(home, VOXA_CLI_CONFIG=str(config)))

    assert json_output(readable)["total_count"] == 0
    assert readable.stderr == f"warning: {config} contains a token that other users can read (mode 644); run chmod 600 {config}\n"
    assert json_output(listed)["total_count"] == 0
    assert listed.stderr == ""

    # VOXA_TOKEN beats the token in the config file.
    overridden = run_cli("app", "list", home=home,
                         env=cli_environment(home, VOXA_CLI_CONFIG=str(config), VOXA_TOKEN=bad_token))
    assert overridden.returncode == 1
    assert error_line(overridden).startswith("error: AUTHENTICATION_REQUIRED: ")


def test_cli_settings_precedence(home, url, tmp_path, devnet_factory):
    # Only the dev node accepts requests without a token, so the exit status shows which URL was used.
    secured_url = devnet_factory(1, extra_args=["--no-dev"]).nodes[0].api_url
    config = tmp_path / "precedence.toml"
    config.write_text(f'url = "{url}"\ntimeout = 5\n', encoding="utf-8")
    default_home = tmp_path / "home"
    default_config = default_home / ".config" / "voxa" / "config.toml"
    default_config.parent.mkdir(parents=True)
    default_config.write_text(f'url = "{url}"\n', encoding="utf-8")

    from_default_file = run_cli("app", "list", "--json", home=default_home)
    from_file = run_cli("app", "list", "--json", home=home, env=cli_environment(home, VOXA_CLI_CONFIG=str(config)))
    env_over_file = run_cli("app", "list", home=home,
                            env=cli_environment(home, VOXA_CLI_CONFIG=str(config), VOXA_URL=secured_url))
    flag_over_env = run_cli("--url", url, "app", "list", "--json", home=home,
                            env=cli_environment(home, VOXA_URL=secured_url))
    flag_config = run_cli("--config", str(config), "app", "list", "--json", home=home,
                          env=cli_environment(home, VOXA_CLI_CONFIG=str(tmp_path / "absent.toml")))

    assert "total_count" in json_output(from_default_file)
    assert "total_count" in json_output(from_file)
    assert env_over_file.returncode == 1
    assert error_line(env_over_file).startswith("error: AUTHENTICATION_REQUIRED: ")
    assert "total_count" in json_output(flag_over_env)
    assert "total_count" in json_output(flag_config)


# --- read-only commands on the shared network ---------------------------------------------


def test_cli_health_table_and_json(home, url):
    table = succeeded(run_cli("--url", url, "health", home=home))
    answer = json_output(run_cli("--url", url, "health", "--json", home=home))

    assert answer["status"] == "healthy"
    assert set(answer["components"]) == {"api", "networking", "storage", "registry"}
    assert re.search(r"^status\s+healthy$", table, re.MULTILINE)
    assert re.search(r"^\s*COMPONENT\s+STATUS\s*$", table, re.MULTILINE)
    assert re.search(r"^\s*storage\s+healthy\s*$", table, re.MULTILINE)


def test_cli_version_table_and_json(home, url):
    table = succeeded(run_cli("--url", url, "version", home=home))
    answer = json_output(run_cli("--url", url, "version", "--json", home=home))

    assert answer["version"]
    assert answer["features"]["app_deployment"] is True
    assert re.search(rf"^version\s+{re.escape(answer['version'])}$", table, re.MULTILINE)
    assert re.search(r"^features\s+.*app_deployment", table, re.MULTILINE)


def test_cli_nodes_table_and_json(home, url, network):
    node_ids = {node.fetch_node_id() for node in network.nodes}

    answer = json_output(run_cli("--url", url, "nodes", "--status", "online", "--json", home=home))
    table = succeeded(run_cli("--url", url, "nodes", "--capability", "app-deployment", home=home))

    assert {node["id"] for node in answer["nodes"]} == node_ids
    assert answer["online_nodes"] == 2
    assert re.search(r"^NODE\s+ADDRESS\s+STATUS\s+CPU %\s+MEMORY %\s+APPS\s+CAPABILITIES\s+LAST SEEN$", table, re.MULTILINE)
    for node in network.nodes:
        row = re.search(rf"^\s*{node.fetch_node_id()}\s+{node.api_host}:{node.api_port}\s+online\s", table, re.MULTILINE)
        assert row, table
    assert "2 nodes, 2 online" in table


def test_cli_data_put_and_get(home, url, network):
    other_url = network.nodes[1].api_url

    stored = json_output(run_cli("--url", url, "data", "put", "cli-settings", '{"theme": "dark", "size": 3}',
                                 "--ttl", "600", "--replicas", "2", "--json", home=home))
    text_table = succeeded(run_cli("--url", url, "data", "put", "cli-note", "not json {", home=home))
    value = json_output(run_cli("--url", other_url, "data", "get", "cli-settings", home=home))
    note = json_output(run_cli("--url", other_url, "data", "get", "cli-note", home=home))
    with_metadata = json_output(run_cli("--url", other_url, "data", "get", "cli-settings", "--json", home=home))

    assert stored["key"] == "cli-settings"
    assert len(stored["storage_nodes"]) == 2
    assert re.search(r"^key\s+cli-note$", text_table, re.MULTILINE)
    assert value == {"theme": "dark", "size": 3}
    assert note == "not json {"
    assert with_metadata["value"] == value
    assert with_metadata["replicas"] == 2
    assert with_metadata["expires_at"].endswith("Z")


def test_cli_data_missing_key_exits_1(home, url):
    completed = run_cli("--url", url, "data", "get", "cli-never-stored", home=home)

    assert completed.returncode == 1
    line = error_line(completed)
    assert line.startswith("error: RESOURCE_NOT_FOUND: ")
    assert "check the key" in line


def test_cli_missing_app_exits_1(home, url):
    completed = run_cli("--url", url, "app", "status", "--app-id", "app-000000000000", home=home)

    assert completed.returncode == 1
    line = error_line(completed)
    assert line.startswith("error: RESOURCE_NOT_FOUND: ")
    assert "app-000000000000" in line
    assert "(field: app_id)" in line
    assert "'voxa-cli app list' shows the app ids" in line


def test_cli_invalid_spec_names_field(home, url):
    completed = run_cli("--url", url, "app", "deploy", "--name", "cli-bad", "--image", TEST_IMAGE,
                        "--replicas", "0", home=home)

    assert completed.returncode == 1
    line = error_line(completed)
    assert line.startswith("error: INVALID_REQUEST: ")
    assert "(field: replicas)" in line
    assert "fix replicas and retry" in line


def test_cli_deploy_missing_image_fails(home, url):
    completed = run_cli("--url", url, "app", "deploy", "--name", "cli-missing-image",
                        "--image", "voxanode-test/absent:latest", *SMALL_APP_ARGS, "--wait", home=home)

    assert completed.returncode == 1
    line = error_line(completed)
    assert line.startswith("error: DEPLOYMENT_FAILED: ")


# --- one app through its life ---------------------------------------------------------------


def test_cli_deploy_wait_runs(home, url, deployed):
    completed = run_cli("--url", url, "app", "deploy", "--name", "cli-web", "--image", TEST_IMAGE,
                        "--replicas", "2", *SMALL_APP_ARGS, "--env", "GREETING=hello=world",
                        "--health-path", "/", "--wait", "--timeout", "60", "--json", home=home)

    status = json_output(completed)
    deployed["app_id"] = status["id"]
    assert status["name"] == "cli-web"
    assert status["status"] == "running"
    assert status["replicas"]["running"] == 2
    assert len(status["instances"]) == 2
    # The progress bar goes to stderr and ends at 2 of 2 running.
    assert re.search(r"cli-web running .*2/2 running", completed.stderr), completed.stderr


def test_cli_app_list_table_and_json(home, url, deployed):
    app_id = need_app(deployed)

    page = json_output(run_cli("--url", url, "app", "list", "--status", "running", "--json", home=home))
    table = succeeded(run_cli("--url", url, "app", "list", home=home))
    first = json_output(run_cli("--url", url, "app", "list", "--limit", "1", "--json", home=home))

    assert [app["id"] for app in page["apps"]] == [app_id]
    assert page["apps"][0]["replicas"] == {"desired": 2, "running": 2, "healthy": 2, "unhealthy": None}
    assert re.search(r"^\s*APP ID\s+NAME\s+STATUS\s+RUNNING\s+HEALTHY\s+NODES\s+UPDATED\s*$", table, re.MULTILINE)
    assert re.search(rf"^\s*{app_id}\s+cli-web\s+running\s+2/2\s+2\s", table, re.MULTILINE), table
    assert first["limit"] == 1
    assert len(first["apps"]) == 1


def test_cli_app_status_table_and_json(home, url, deployed):
    app_id = need_app(deployed)

    status = json_output(run_cli("--url", url, "app", "status", "--app-id", app_id, "--json", home=home))
    table = succeeded(run_cli("--url", url, "app", "status", "--app-id", app_id, home=home))

    assert status["image"] == TEST_IMAGE
    assert {instance["status"] for instance in status["instances"]} == {"running"}
    assert re.search(r"^replicas\s+2 desired, 2 running, 2 healthy, 0 unhealthy$", table, re.MULTILINE), table
    for instance in status["instances"]:
        port = instance["ports"][0]
        published = f"{port['host_ip']}:{port['host_port']}->8080/tcp"
        assert re.search(rf"^\s*{instance['id']}\s+{instance['node_id']}\s+running\s+healthy\s+{re.escape(published)}\s",
                         table, re.MULTILINE), table


def test_cli_app_logs_prints_container_line(home, url, deployed):
    app_id = need_app(deployed)

    def start_lines() -> list[re.Match]:
        completed = run_cli("--url", url, "app", "logs", "--app-id", app_id, "--tail", "50", home=home)
        lines = succeeded(completed).splitlines()
        matches = [LOG_LINE_PATTERN.match(line) for line in lines]
        assert all(matches), lines
        return [match for match in matches if match["message"] == TEST_IMAGE_START_LINE]

    found = wait_for(lambda: len(start_lines()) == 2, 15)
    assert found, "the start line of both instances did not arrive"
    matches = start_lines()
    assert {match["level"] for match in matches} == {"info"}
    assert len({match["instance"] for match in matches}) == 2

    entries = succeeded(run_cli("--url", url, "app", "logs", "--app-id", app_id, "--json", home=home)).splitlines()
    start_entries = [entry for entry in map(json.loads, entries) if entry["message"] == TEST_IMAGE_START_LINE]
    assert len(start_entries) == 2
    assert {entry["metadata"]["stream"] for entry in start_entries} == {"stdout"}


def test_cli_app_logs_follow_ends_on_ctrl_c(home, url, deployed):
    app_id = need_app(deployed)
    process = subprocess.Popen(
        [*CLI_COMMAND, "--url", url, "app", "logs", "--app-id", app_id, "--follow", "--tail", "1"],
        cwd=REPO_DIR, env=cli_environment(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=default_ctrl_c,
    )
    try:
        assert LOG_LINE_PATTERN.match(read_line_within(process, STREAM_LINE_SECONDS))
        returncode, stderr = interrupt(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert returncode == 0, stderr
    assert "error" not in stderr


def test_cli_app_scale(home, url, deployed):
    app_id = need_app(deployed)

    table = succeeded(run_cli("--url", url, "app", "scale", "--app-id", app_id, "--replicas", "1", home=home))
    answer = json_output(run_cli("--url", url, "app", "scale", "--app-id", app_id, "--replicas", "1", "--json",
                                 home=home))

    assert re.search(r"^replicas\s+2 -> 1$", table, re.MULTILINE), table
    assert answer["app_id"] == app_id
    assert answer["previous_replicas"] == 1
    assert answer["new_replicas"] == 1

    def scaled_down() -> bool:
        status = json_output(run_cli("--url", url, "app", "status", "--app-id", app_id, "--json", home=home))
        return status["replicas"]["desired"] == 1 and status["replicas"]["running"] == 1

    assert wait_for(scaled_down, 30)


def test_cli_events_stream_ends_on_ctrl_c(home, url):
    process = subprocess.Popen(
        [*CLI_COMMAND, "--url", url, "events", "--types", "app_deployed"],
        cwd=REPO_DIR, env=cli_environment(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=default_ctrl_c,
    )
    try:
        # Let the stream connect before the event happens, because it does not replay by default.
        time.sleep(1.5)
        deploy = run_cli("--url", url, "app", "deploy", "--name", "cli-events", "--image", TEST_IMAGE,
                         *SMALL_APP_ARGS, "--json", home=home)
        app_id = json_output(deploy)["id"]
        line = read_line_within(process, STREAM_LINE_SECONDS)
        returncode, stderr = interrupt(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert re.match(rf"^\S+Z app_deployed node-[0-9a-f]+ subject={{\"app_id\":\"{app_id}\"}} data=\{{.*\"name\":\"cli-events\"",
                    line), line
    assert returncode == 0, stderr

    stopped = run_cli("--url", url, "app", "stop", "--app-id", app_id, "--force", home=home)
    assert re.search(r"^instances stopped\s+1$", succeeded(stopped), re.MULTILINE)


def test_cli_app_stop(home, url, deployed):
    app_id = need_app(deployed)

    answer = json_output(run_cli("--url", url, "app", "stop", "--app-id", app_id, "--json", home=home))
    listed = json_output(run_cli("--url", url, "app", "list", "--status", "stopped", "--json", home=home))

    assert answer["app_id"] == app_id
    assert answer["instances_stopped"] == 1
    assert app_id in {app["id"] for app in listed["apps"]}
