"""`voxanode check-config`, `keygen` and `identity`, run as real processes."""

import json
import os
import stat

import pytest

from test_daemon_cli import run_voxanode
from voxanode.identity import KEY_FILE_NAME, Identity
from voxanode.tokens import Scope, create_token, token_file_path


def test_keygen_creates_a_key_once(tmp_path):
    data_dir = tmp_path / "data"
    created = run_voxanode(tmp_path, "keygen", "--data-dir", str(data_dir))
    assert created.returncode == 0, created.stderr
    lines = dict(line.split(": ", 1) for line in created.stdout.splitlines())
    key_path = data_dir / KEY_FILE_NAME
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    identity = Identity.load(data_dir)
    assert lines == {
        "node_id": identity.node_id,
        "public_key": identity.public_key.hex(),
        "dht_id": identity.dht_id.hex(),
        "key_file": str(key_path),
    }

    before = key_path.read_bytes()
    again = run_voxanode(tmp_path, "keygen", "--data-dir", str(data_dir))
    assert again.returncode == 2
    assert again.stderr.startswith(f"voxanode keygen: error: a node key already exists at {key_path}")
    assert key_path.read_bytes() == before
    assert sorted(os.listdir(data_dir)) == [KEY_FILE_NAME]


def test_identity_shows_the_key_as_json(tmp_path):
    identity = Identity.create(tmp_path)
    shown = run_voxanode(tmp_path, "identity", "--data-dir", str(tmp_path), "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["node_id"] == identity.node_id


def test_identity_without_key_explains_keygen(tmp_path):
    shown = run_voxanode(tmp_path, "identity", "--data-dir", str(tmp_path / "empty"))
    assert shown.returncode == 2
    assert "no node key at" in shown.stderr
    assert "voxanode keygen" in shown.stderr
    assert not (tmp_path / "empty").exists()


def test_check_config_valid_files(tmp_path):
    (tmp_path / "settings.json").write_text(json.dumps({"api_port": 9100, "log_format": "json"}))
    (tmp_path / "peers.json").write_text(json.dumps(["127.0.0.9:9999", "127.0.0.10:9999"]))
    data_dir = tmp_path / "state"
    Identity.create(data_dir)
    create_token(token_file_path(data_dir), "ops", Scope.ADMIN)
    checked = run_voxanode(
        tmp_path, "check-config", "--config", "settings.json", "--bootstrap-file", "peers.json",
        "--data-dir", str(data_dir),
    )
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr == ""
    assert "bootstrap peers: 2" in checked.stdout
    assert "tokens: 1 active of 1" in checked.stdout
    assert checked.stdout.rstrip().endswith("configuration is valid")


def test_check_config_changes_nothing(tmp_path):
    data_dir = tmp_path / "not-yet"
    checked = run_voxanode(tmp_path, "check-config", "--data-dir", str(data_dir))
    assert checked.returncode == 0, checked.stderr
    assert "will be created" in checked.stdout
    assert not data_dir.exists()


@pytest.mark.parametrize(
    "files, args, expected",
    [
        ({"settings.json": '{"api_port": 70000}'}, ["--config", "settings.json"], "invalid setting api_port=70000"),
        ({"settings.json": '{"api_prot": 9000}'}, ["--config", "settings.json"], "api_prot"),
        ({"peers.json": '["127.0.0.1"]'}, ["--bootstrap-file", "peers.json"], "entry 1"),
        ({"peers.json": "{broken"}, ["--bootstrap-file", "peers.json"], "bootstrap_file"),
        ({"data/node_key.pem": "not a key"}, ["--data-dir", "data"], "cannot read node key"),
        ({"data/tokens.json": "[1, 2"}, ["--data-dir", "data"], "tokens.json"),
    ],
    ids=["port-range", "unknown-key", "peer-without-port", "broken-json", "bad-key", "bad-tokens"],
)
def test_check_config_reports_problems(tmp_path, files, args, expected):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    checked = run_voxanode(tmp_path, "check-config", *args)
    assert checked.returncode == 2
    assert checked.stdout == ""
    assert checked.stderr.startswith("voxanode check-config: error: ")
    assert expected in checked.stderr


def test_check_config_reports_every_file_problem(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / KEY_FILE_NAME).write_text("not a key")
    (data_dir / "tokens.json").write_text("{")
    checked = run_voxanode(tmp_path, "check-config", "--data-dir", str(data_dir))
    assert checked.returncode == 2
    assert len(checked.stderr.splitlines()) == 2, checked.stderr


def test_check_config_unusable_data_dir_path(tmp_path):
    # A name longer than the file system allows makes every stat of the path fail.
    data_dir = tmp_path / ("d" * 300)
    checked = run_voxanode(tmp_path, "check-config", "--data-dir", str(data_dir))
    assert checked.returncode == 2, checked.stderr
    assert "Traceback" not in checked.stderr
    assert checked.stderr.startswith("voxanode check-config: error: data_dir")


def test_client_variables_do_not_stop_the_daemon_commands(tmp_path):
    environment = {"VOXA_TIMEOUT": "30", "VOXA_CLI_CONFIG": str(tmp_path / "cli.toml")}
    checked = run_voxanode(tmp_path, "check-config", "--data-dir", str(tmp_path), env=environment)
    assert checked.returncode == 0, checked.stderr


def test_check_config_warns_without_tokens(tmp_path):
    checked = run_voxanode(tmp_path, "check-config", "--data-dir", str(tmp_path))
    assert checked.returncode == 0, checked.stderr
    assert "warning: every request except GET /status/health will be rejected" in checked.stdout
