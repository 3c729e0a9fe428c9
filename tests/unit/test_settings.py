"""Unit tests of voxanode.settings: precedence, validation, peer addresses, the example file."""

import dataclasses
import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from voxanode.settings import (
    SETTING_SPECS,
    SPECS_BY_NAME,
    UNKNOWN_GIT_COMMIT,
    BindError,
    Settings,
    SettingsError,
    default_settings_document,
    display_value,
    format_default_settings_document,
    load_settings,
    parse_peer_address,
    resolve_git_commit,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def write_json(path: Path, document: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def load(tmp_path: Path, flags=None, environ=None, settings_file=None) -> Settings:
    """Load settings in tmp_path, with an optional ./config/settings.json document."""
    if settings_file is not None:
        write_json(tmp_path / "config" / "settings.json", settings_file)
    return load_settings(flags or {}, environ or {}, tmp_path)


# Defaults and precedence


def test_load_settings_without_input_gives_defaults(tmp_path):
    settings = load(tmp_path)

    expected = dataclasses.replace(Settings(), data_dir=tmp_path / "data")
    assert settings == expected
    assert settings.config_file is None
    assert settings.bootstrap_file is None
    assert settings.bootstrap_peers == ()
    assert all(settings.source_of(spec.name) == "default" for spec in SETTING_SPECS)


@pytest.mark.parametrize(
    ("file_port", "env_port", "flag_port", "expected_port", "expected_source"),
    [
        (None, None, None, 9999, "default"),
        (1001, None, None, 1001, "FILE"),
        (1001, "1002", None, 1002, "VOXA_API_PORT"),
        (1001, "1002", "1003", 1003, "--api-port"),
        (None, None, "1003", 1003, "--api-port"),
        (1001, None, "1003", 1003, "--api-port"),
    ],
)
def test_load_settings_precedence(
    tmp_path, file_port, env_port, flag_port, expected_port, expected_source
):
    settings_file = {} if file_port is None else {"api_port": file_port}
    environ = {} if env_port is None else {"VOXA_API_PORT": env_port}
    flags = {} if flag_port is None else {"api_port": flag_port}

    settings = load(tmp_path, flags, environ, settings_file)

    file_path = str(tmp_path / "config" / "settings.json")
    assert settings.api_port == expected_port
    assert settings.source_of("api_port") == expected_source.replace("FILE", file_path)


def test_load_settings_types_per_layer(tmp_path):
    settings_file = {
        "dev": True,
        "log_level": "warning",
        "rpc_timeout_seconds": 0.5,
        "bootstrap": ["node1.example:4000"],
        "git_commit": "abc1234",
    }
    from_file = load(tmp_path, settings_file=settings_file)
    assert from_file.dev is True
    assert from_file.log_level == "WARNING"
    assert from_file.rpc_timeout_seconds == 0.5
    assert from_file.bootstrap == ("node1.example:4000",)
    assert from_file.git_commit == "abc1234"

    environ = {
        "VOXA_DEV": "no",
        "VOXA_LOG_LEVEL": "Debug",
        "VOXA_RPC_TIMEOUT_SECONDS": "1.5",
        "VOXA_BOOTSTRAP": "a.example:1, b.example:2",
        "VOXA_GIT_COMMIT": "def5678",
    }
    from_env = load(tmp_path, environ=environ)
    assert from_env.dev is False
    assert from_env.log_level == "DEBUG"
    assert from_env.rpc_timeout_seconds == 1.5
    assert from_env.bootstrap == ("a.example:1", "b.example:2")
    assert from_env.git_commit == "def5678"


def test_load_settings_accepts_typed_flag_values(tmp_path):
    flags = {"api_port": 8080, "dev": True, "bootstrap": ["10.0.0.1:9000"], "alpha": "5"}

    settings = load(tmp_path, flags)

    assert settings.api_port == 8080
    assert settings.dev is True
    assert settings.bootstrap_peers == (("10.0.0.1", 9000),)
    assert settings.alpha == 5


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1", True), ("true", True), ("YES", True), ("0", False), ("False", False), ("no", False)],
)
def test_load_settings_dev_env_words(tmp_path, text, expected):
    assert load(tmp_path, environ={"VOXA_DEV": text}).dev is expected


def test_load_settings_relative_paths_join_cwd(tmp_path):
    write_json(tmp_path / "peers" / "list.json", [])
    flags = {"data_dir": "state/node", "bootstrap_file": "peers/list.json"}

    settings = load(tmp_path, flags)

    assert settings.data_dir == tmp_path / "state" / "node"
    assert settings.bootstrap_file == tmp_path / "peers" / "list.json"
    assert load(tmp_path, {"data_dir": "/srv/voxa"}).data_dir == Path("/srv/voxa")


def test_load_settings_ignores_client_variables(tmp_path):
    environ = {"VOXA_URL": "http://127.0.0.1:1", "VOXA_TOKEN": "t", "HOME": "/root", "voxa_x": "1"}

    assert load(tmp_path, environ=environ) == load(tmp_path)


def test_load_settings_rejects_unknown_flag_name(tmp_path):
    with pytest.raises(ValueError, match="not a setting name"):
        load(tmp_path, {"no_such_setting": "1"})


def test_settings_is_frozen_and_replaceable():
    settings = Settings()

    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.api_port = 1  # type: ignore[misc]
    assert dataclasses.replace(settings, api_port=1).api_port == 1


# Settings files


def test_config_file_default_is_used_when_present(tmp_path):
    settings = load(tmp_path, settings_file={"ksize": 8, "default_replicas": 2})

    assert settings.config_file == tmp_path / "config" / "settings.json"
    assert settings.ksize == 8
    assert settings.source_of("ksize") == str(settings.config_file)


@pytest.mark.parametrize("source", ["flag", "env"])
def test_config_file_named_explicitly_is_read(tmp_path, source):
    path = write_json(tmp_path / "elsewhere.json", {"alpha": 7})
    write_json(tmp_path / "config" / "settings.json", {"alpha": 2})
    flags = {"config_file": "elsewhere.json"} if source == "flag" else {}
    environ = {"VOXA_CONFIG": str(path)} if source == "env" else {}

    settings = load(tmp_path, flags, environ)

    assert settings.config_file == path
    assert settings.alpha == 7


def test_repository_settings_file_matches_defaults():
    text = (REPO_ROOT / "config" / "settings.json").read_text(encoding="utf-8")

    regenerate = (
        "python -c 'from voxanode.settings import format_default_settings_document as f; "
        "print(f(), end=\"\")' > config/settings.json"
    )
    assert text == format_default_settings_document(), f"regenerate with: {regenerate}"


def test_default_settings_document_lists_every_file_key():
    document = default_settings_document()

    expected_keys = [spec.name for spec in SETTING_SPECS if spec.name != "config_file"]
    assert list(document) == expected_keys
    assert document["data_dir"] == "./data"
    assert document["bootstrap"] == []
    assert document["bootstrap_file"] is None


def test_repository_settings_file_loads_as_defaults():
    repo_settings = load_settings({}, {}, REPO_ROOT)

    comparable = dataclasses.replace(
        repo_settings, config_file=None, bootstrap_file=None, data_dir=Path("data")
    )
    assert comparable == Settings()
    assert repo_settings.config_file == REPO_ROOT / "config" / "settings.json"


def test_repository_bootstrap_file_is_empty_list():
    text = (REPO_ROOT / "bootstrap_peers.json").read_text(encoding="utf-8")

    assert json.loads(text) == []


# Bootstrap peers


def test_bootstrap_peers_combine_file_and_setting(tmp_path):
    write_json(tmp_path / "bootstrap_peers.json", ["a.example:1", "[::1]:2", "A.example:1"])
    flags = {"bootstrap": ["[0:0::1]:2", "c.example:3", "a.example:1"]}

    settings = load(tmp_path, flags)

    assert settings.bootstrap_file == tmp_path / "bootstrap_peers.json"
    assert settings.bootstrap == ("[0:0::1]:2", "c.example:3", "a.example:1")
    assert settings.bootstrap_peers == (("a.example", 1), ("::1", 2), ("c.example", 3))


def test_bootstrap_file_default_missing_is_silent(tmp_path):
    settings = load(tmp_path, environ={"VOXA_BOOTSTRAP": "10.0.0.1:5"})

    assert settings.bootstrap_file is None
    assert settings.bootstrap_peers == (("10.0.0.1", 5),)


def test_bootstrap_file_null_uses_default(tmp_path):
    write_json(tmp_path / "bootstrap_peers.json", ["10.0.0.2:7"])

    settings = load(tmp_path, settings_file={"bootstrap_file": None})

    assert settings.bootstrap_peers == (("10.0.0.2", 7),)


def test_bootstrap_env_empty_gives_no_peers(tmp_path):
    settings_file = {"bootstrap": ["10.0.0.1:5"]}

    settings = load(tmp_path, environ={"VOXA_BOOTSTRAP": ""}, settings_file=settings_file)

    assert settings.bootstrap == ()
    assert settings.bootstrap_peers == ()


# Validation errors


def settings_error(tmp_path, flags=None, environ=None, settings_file=None) -> SettingsError:
    with pytest.raises(SettingsError) as caught:
        load(tmp_path, flags, environ, settings_file)
    return caught.value


ERROR_CASES = [
    # (case id, flags, environ, settings file, setting named, text in the message)
    ("port flag too high", {"api_port": "70000"}, {}, None, "api_port",
     "invalid setting api_port=70000 (from --api-port): must be an integer from 1 to 65535"),
    ("port env zero", {}, {"VOXA_PEER_PORT": "0"}, None, "peer_port",
     "peer_port=0 (from VOXA_PEER_PORT): must be an integer from 1 to 65535"),
    ("port env not a number", {}, {"VOXA_API_PORT": "http"}, None, "api_port",
     "api_port=http (from VOXA_API_PORT)"),
    ("port as JSON string", {}, {}, {"api_port": "9999"}, "api_port",
     'api_port="9999" (from '),
    ("port as JSON float", {}, {}, {"api_port": 9999.5}, "api_port", "must be an integer"),
    ("unknown key with suggestion", {}, {}, {"api_prot": 1}, "api_prot",
     'unknown setting "api_prot" in '),
    ("unknown env with suggestion", {}, {"VOXA_DATADIR": "x"}, None, "VOXA_DATADIR",
     "unknown environment variable VOXA_DATADIR; did you mean VOXA_DATA_DIR"),
    ("unknown key without match", {}, {}, {"zzzzzz": 1}, "zzzzzz",
     "run voxanode --help for the list of settings"),
    ("config_file inside file", {}, {}, {"config_file": "x.json"}, "config_file",
     "config_file cannot be set inside the settings file"),
    ("bad bootstrap flag", {"bootstrap": ["a.example:1", "nohost"]}, {}, None, "bootstrap",
     'expected HOST:PORT, such as 10.0.0.5:9999, node1.example:9999 or [::1]:9999, got "nohost"'),
    ("bad bootstrap env entry", {}, {"VOXA_BOOTSTRAP": "a.example:1,b.example:0"}, None,
     "bootstrap", "(from VOXA_BOOTSTRAP): expected HOST:PORT with a port from 1 to 65535"),
    ("bootstrap not a list in file", {}, {}, {"bootstrap": "a.example:1"}, "bootstrap",
     'must be a JSON list of "HOST:PORT" strings'),
    ("bootstrap entry not a string", {}, {}, {"bootstrap": [5]}, "bootstrap",
     'entry 5 must be a "HOST:PORT" string'),
    ("bad bool env", {}, {"VOXA_DEV": "maybe"}, None, "dev",
     "dev=maybe (from VOXA_DEV): must be one of 1, 0, true, false, yes, no"),
    ("bool as string in file", {}, {}, {"dev": "true"}, "dev",
     "must be true or false (a JSON boolean)"),
    ("bad log level", {"log_level": "verbose"}, {}, None, "log_level",
     "must be one of DEBUG, INFO, WARNING, ERROR (any case)"),
    ("ttl default above max", {"default_ttl_seconds": "7200", "max_ttl_seconds": "3600"}, {},
     None, "default_ttl_seconds",
     "default_ttl_seconds=7200 (from --default-ttl-seconds): must be at most "
     "max_ttl_seconds=3600 (from --max-ttl-seconds)"),
    ("max ttl below default", {}, {"VOXA_MAX_TTL_SECONDS": "60"}, None, "max_ttl_seconds",
     "max_ttl_seconds=60 (from VOXA_MAX_TTL_SECONDS): must be at least "
     "default_ttl_seconds=3600 (from default)"),
    ("replicas above ksize", {"default_replicas": "9", "ksize": "4"}, {}, None,
     "default_replicas", "must be at most ksize=4 (from --ksize)"),
    ("ksize below default replicas", {"ksize": "2"}, {}, None, "ksize",
     "must be at least default_replicas=3 (from default)"),
    ("body not above value", {"max_body_bytes": "65536"}, {}, None, "max_body_bytes",
     "must be greater than max_value_bytes=65536 (from default)"),
    ("value not below body", {"max_value_bytes": "2000000"}, {}, None, "max_value_bytes",
     "must be less than max_body_bytes=1048576 (from default)"),
    ("ksize too high", {"ksize": "65"}, {}, None, "ksize", "must be an integer from 1 to 64"),
    ("alpha zero", {}, {}, {"alpha": 0}, "alpha", "must be an integer from 1 to 16"),
    ("rpc timeout zero", {"rpc_timeout_seconds": "0"}, {}, None, "rpc_timeout_seconds",
     "must be a number greater than 0 and at most 60"),
    ("rpc timeout too long", {}, {"VOXA_RPC_TIMEOUT_SECONDS": "61"}, None,
     "rpc_timeout_seconds", "must be a number greater than 0 and at most 60"),
    ("rpc timeout nan", {"rpc_timeout_seconds": "nan"}, {}, None, "rpc_timeout_seconds",
     "must be a number greater than 0"),
    ("datagram too small", {"max_datagram_bytes": "1023"}, {}, None, "max_datagram_bytes",
     "must be an integer from 1024 to 65000"),
    ("negative clock skew", {"clock_skew_seconds": "-1"}, {}, None, "clock_skew_seconds",
     "must be a number of at least 0"),
    ("interval zero", {}, {}, {"sweep_interval_seconds": 0}, "sweep_interval_seconds",
     "must be a number greater than 0"),
    ("empty data dir", {}, {"VOXA_DATA_DIR": ""}, None, "data_dir", "must be a non-empty path"),
    ("bad api host", {"api_host": "bad host"}, {}, None, "api_host",
     "must be a host name or an IP address"),
    ("bad ipv4 host", {"peer_host": "300.1.1.1"}, {}, None, "peer_host",
     "must be a valid IPv4 address"),
    ("git commit with space", {}, {"VOXA_GIT_COMMIT": "a b"}, None, "git_commit",
     "must be a commit id"),
    ("missing explicit bootstrap file", {"bootstrap_file": "none.json"}, {}, None,
     "bootstrap_file", "cannot read the file (No such file or directory)"),
]


@pytest.mark.parametrize(
    ("flags", "environ", "settings_file", "setting", "message_part"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_load_settings_error(tmp_path, flags, environ, settings_file, setting, message_part):
    error = settings_error(tmp_path, flags, environ, settings_file)

    assert error.setting == setting
    assert message_part in str(error)
    assert "\n" not in str(error)


def test_unknown_key_suggests_close_match(tmp_path):
    error = settings_error(tmp_path, settings_file={"api_prot": 1})

    assert "did you mean api_port" in str(error)
    assert str(tmp_path / "config" / "settings.json") in str(error)


def test_overridden_invalid_value_still_fails(tmp_path):
    error = settings_error(tmp_path, {"api_port": "8080"}, settings_file={"api_port": -1})

    assert error.setting == "api_port"
    assert "(from " + str(tmp_path / "config" / "settings.json") + ")" in str(error)


def test_long_value_is_shortened(tmp_path):
    error = settings_error(tmp_path, {"api_host": "x" * 500 + " y"})

    assert "x" * 37 + "..." in str(error)
    assert len(str(error)) < 200


def test_control_characters_stay_on_one_line(tmp_path):
    error = settings_error(tmp_path, environ={"VOXA_LOG_LEVEL": "bad\nlevel"})

    assert "\n" not in str(error)
    assert "bad\\nlevel" in str(error)


def config_file_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Broken settings files, keyed by case, with the text their error must contain."""
    directory = tmp_path / "is_a_directory.json"
    directory.mkdir()
    cases = {
        "missing": (tmp_path / "missing.json", "cannot read the file (No such file or directory)"),
        "directory": (directory, "cannot read the file (Is a directory)"),
        "list": (
            write_json(tmp_path / "list.json", []),
            "must contain a JSON object of settings, not a list",
        ),
        "string": (write_json(tmp_path / "string.json", "x"), "not a string"),
        "not json": (tmp_path / "broken.json", "the file is not valid JSON: Expecting"),
        "duplicate key": (tmp_path / "duplicate.json", 'duplicate key "alpha"'),
        "not utf-8": (tmp_path / "latin1.json", "the file is not UTF-8 text"),
    }
    (tmp_path / "broken.json").write_text('{"alpha": ', encoding="utf-8")
    (tmp_path / "duplicate.json").write_text('{"alpha": 2, "alpha": 3}', encoding="utf-8")
    (tmp_path / "latin1.json").write_bytes('{"api_host": "h\xf6st"}'.encode("latin-1"))
    return cases


@pytest.mark.parametrize(
    "case", ["missing", "directory", "list", "string", "not json", "duplicate key", "not utf-8"]
)
def test_config_file_error(tmp_path, case):
    path, message_part = config_file_cases(tmp_path)[case]

    error = settings_error(tmp_path, {"config_file": str(path)})

    assert error.setting == "config_file"
    assert f"invalid setting config_file={path} (from --config)" in str(error)
    assert message_part in str(error)


def test_default_config_file_broken_is_an_error(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "settings.json").write_text("[1, 2]", encoding="utf-8")

    error = settings_error(tmp_path)

    assert error.setting == "config_file"
    assert "(from default)" in str(error)


@pytest.mark.parametrize(
    ("document", "message_part"),
    [
        ({"peers": []}, 'must contain a JSON list of "HOST:PORT" strings, not an object'),
        (["a.example:1", 7], 'entry 2 must be a "HOST:PORT" string, not a number'),
        (["a.example:1", "b.example"], 'entry 2: expected HOST:PORT, such as'),
    ],
)
def test_bootstrap_file_error(tmp_path, document, message_part):
    path = write_json(tmp_path / "peers.json", document)

    error = settings_error(tmp_path, environ={"VOXA_BOOTSTRAP_FILE": str(path)})

    assert error.setting == "bootstrap_file"
    assert f"bootstrap_file={path} (from VOXA_BOOTSTRAP_FILE)" in str(error)
    assert message_part in str(error)


def test_default_bootstrap_file_broken_is_an_error(tmp_path):
    write_json(tmp_path / "bootstrap_peers.json", ["no port"])

    error = settings_error(tmp_path)

    assert error.setting == "bootstrap_file"
    assert "(from default): entry 1" in str(error)


# Peer addresses


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("localhost:9999", ("localhost", 9999)),
        ("Node-1.Example.ORG:1", ("node-1.example.org", 1)),
        ("voxa_node1:65535", ("voxa_node1", 65535)),
        ("example.org.:80", ("example.org", 80)),
        ("10.0.0.5:9999", ("10.0.0.5", 9999)),
        ("  10.0.0.5:9999 ", ("10.0.0.5", 9999)),
        ("[::1]:9999", ("::1", 9999)),
        ("[2001:DB8:0::1]:4000", ("2001:db8::1", 4000)),
        ("[fe80::1%eth0]:7", ("fe80::1%eth0", 7)),
    ],
)
def test_parse_peer_address_valid(text, expected):
    assert parse_peer_address(text) == expected


@pytest.mark.parametrize(
    ("text", "message_part"),
    [
        ("localhost", "expected HOST:PORT, such as"),
        ("", "expected HOST:PORT, such as"),
        ("localhost:", "with a port from 1 to 65535"),
        ("localhost:0", "with a port from 1 to 65535"),
        ("localhost:70000", "with a port from 1 to 65535"),
        ("localhost:+80", "with a port from 1 to 65535"),
        ("localhost:http", "with a port from 1 to 65535"),
        (":9999", "the host must not be empty"),
        ("::1:9999", "with an IPv6 host in brackets"),
        ("[::1]", "expected HOST:PORT, such as"),
        ("[::1]9999", "expected HOST:PORT, such as"),
        ("[10.0.0.1]:80", "with brackets only around IPv6"),
        ("[not:an:ip]:80", "the host must be a host name or an IP address"),
        ("256.0.0.1:80", "the host must be a valid IPv4 address"),
        ("bad host:80", "the host must be a host name or an IP address"),
        ("-bad.example:80", "the host must be a host name or an IP address"),
        ("a..b:80", "the host must be a host name or an IP address"),
    ],
)
def test_parse_peer_address_invalid(text, message_part):
    with pytest.raises(ValueError) as caught:
        parse_peer_address(text)

    assert str(caught.value).startswith("expected HOST:PORT")
    assert message_part in str(caught.value)


# The settings table


def test_setting_specs_have_unique_flags_and_env_twins():
    flags = [spec.flag for spec in SETTING_SPECS]
    envs = [spec.env for spec in SETTING_SPECS]

    assert len(set(flags)) == len(flags)
    assert len(set(envs)) == len(envs)
    assert all(spec.help and spec.default_text for spec in SETTING_SPECS)


def test_setting_specs_flag_and_env_names():
    named = {
        "config_file": ("--config", "VOXA_CONFIG"),
        "data_dir": ("--data-dir", "VOXA_DATA_DIR"),
        "bootstrap_file": ("--bootstrap-file", "VOXA_BOOTSTRAP_FILE"),
        "rpc_timeout_seconds": ("--rpc-timeout-seconds", "VOXA_RPC_TIMEOUT_SECONDS"),
        "git_commit": ("--git-commit", "VOXA_GIT_COMMIT"),
    }
    for name, (flag, env) in named.items():
        assert SPECS_BY_NAME[name].flag == flag
        assert SPECS_BY_NAME[name].env == env
    for spec in SETTING_SPECS:
        if spec.name not in named:
            assert spec.flag == "--" + spec.name.replace("_", "-")
            assert spec.env == "VOXA_" + spec.name.upper()


def test_setting_defaults_pass_their_own_rules():
    for spec in SETTING_SPECS:
        raw = default_settings_document().get(spec.name, spec.default)
        if raw is None:
            continue
        parsed = spec.rule.parse(raw, from_text=False)
        assert parsed == spec.default, spec.name


# BindError and the git commit


def test_bind_error_keeps_setting_and_errno():
    os_error = OSError(errno.EADDRINUSE, "Address already in use")

    error = BindError("api_port", "::1", 9999, os_error)

    assert isinstance(error, OSError)
    assert error.errno == errno.EADDRINUSE
    assert (error.setting, error.host, error.port) == ("api_port", "::1", 9999)
    assert str(error) == "cannot bind api_port on [::1]:9999: Address already in use"


def test_bind_error_replaces_asyncio_wording():
    asyncio_text = "error while attempting to bind on address ('127.0.0.1', 1): address in use"
    os_error = OSError(errno.EADDRINUSE, asyncio_text)

    error = BindError("peer_port", "127.0.0.1", 1, os_error)

    assert error.strerror == os.strerror(errno.EADDRINUSE)
    assert error.os_error is os_error


def test_resolve_git_commit_prefers_environment(tmp_path):
    commit = resolve_git_commit({"VOXA_GIT_COMMIT": " abc1234 "}, checkout_dir=tmp_path)

    assert commit == "abc1234"


def test_resolve_git_commit_outside_checkout_is_unknown(tmp_path):
    assert resolve_git_commit({}, checkout_dir=tmp_path) == UNKNOWN_GIT_COMMIT


def run_git(directory: Path, *args: str) -> str:
    environ = {
        **os.environ,
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.invalid",
    }
    completed = subprocess.run(
        ["git", "-C", str(directory), *args],
        capture_output=True, text=True, check=True, timeout=30, env=environ,
    )
    return completed.stdout.strip()


def test_resolve_git_commit_reads_checkout_head(tmp_path):
    run_git(tmp_path, "init", "--quiet")
    run_git(tmp_path, "commit", "--quiet", "--allow-empty", "--message", "first")
    expected = run_git(tmp_path, "rev-parse", "--short", "HEAD")

    assert resolve_git_commit({}, checkout_dir=tmp_path) == expected


def test_resolve_git_commit_without_commits_is_unknown(tmp_path):
    run_git(tmp_path, "init", "--quiet")

    assert resolve_git_commit({}, checkout_dir=tmp_path) == UNKNOWN_GIT_COMMIT


def test_resolve_git_commit_without_git_binary_is_unknown(tmp_path, monkeypatch):
    run_git(tmp_path, "init", "--quiet")
    run_git(tmp_path, "commit", "--quiet", "--allow-empty", "--message", "first")
    empty_bin = tmp_path / "empty-bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))

    assert resolve_git_commit({}, checkout_dir=tmp_path) == UNKNOWN_GIT_COMMIT


def test_display_value_names_empty_lists_none():
    assert display_value(()) == "none"
    assert display_value(None) == "none"
    assert display_value(("127.0.0.0/8",)) == "127.0.0.0/8"
