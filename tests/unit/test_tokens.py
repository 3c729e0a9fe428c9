"""API tokens: the token file, the daemon's TokenStore, and the `voxanode token` command."""

import hashlib
import json
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from voxanode import tokens
from voxanode.api.auth import check_token, required_scope, setup_auth
from voxanode.api.keys import NODE_KEY, STATS_KEY
from voxanode.api.middlewares import build_api_middleware
from voxanode.api.stats import RequestStats
from voxanode.settings import Settings
from voxanode.daemon import main
from voxanode.tokens import (
    Scope,
    TokenFileError,
    TokenStore,
    TokenUsageError,
    create_token,
    hash_token,
    is_well_formed_token,
    new_token,
    read_token_file,
    revoke_token,
    token_file_path,
    write_token_file,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMAND_TIMEOUT_SECONDS = 60
CONCURRENT_READS = 300


@pytest.fixture
def token_path(tmp_path: Path) -> Path:
    return token_file_path(tmp_path)


def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drop VOXA_* variables, so only the test's flags choose the settings."""
    for name in list(os.environ):
        if name.startswith("VOXA_"):
            monkeypatch.delenv(name)


# --- tokens and scopes ------------------------------------------------------------------


def test_new_token_format():
    token = new_token()

    assert token.startswith("voxa_")
    assert is_well_formed_token(token)
    assert len(token) == len("voxa_") + 43
    assert new_token() != token


@pytest.mark.parametrize(
    "text",
    [
        "",
        "voxa_",
        "voxa_short",
        "Voxa_" + "a" * 43,
        "voxa_" + "a" * 44,
        "voxa_" + "a" * 42 + "=",
        "voxa_" + "a" * 42 + " ",
    ],
)
def test_malformed_tokens_rejected(text):
    assert not is_well_formed_token(text)


@pytest.mark.parametrize(
    ("scope", "required", "allowed"),
    [
        (Scope.READ, Scope.READ, True),
        (Scope.READ, Scope.WRITE, False),
        (Scope.READ, Scope.ADMIN, False),
        (Scope.WRITE, Scope.READ, True),
        (Scope.WRITE, Scope.WRITE, True),
        (Scope.WRITE, Scope.ADMIN, False),
        (Scope.ADMIN, Scope.READ, True),
        (Scope.ADMIN, Scope.WRITE, True),
        (Scope.ADMIN, Scope.ADMIN, True),
    ],
)
def test_scope_allows_table(scope, required, allowed):
    assert scope.allows(required) is allowed


@pytest.mark.parametrize(
    ("method", "scope"),
    [
        ("GET", Scope.READ),
        ("HEAD", Scope.READ),
        ("POST", Scope.WRITE),
        ("PUT", Scope.WRITE),
        ("DELETE", Scope.WRITE),
        ("PATCH", Scope.WRITE),
        ("OPTIONS", Scope.WRITE),
    ],
)
def test_required_scope_by_method(method, scope):
    assert required_scope(method) is scope


# --- the token file -------------------------------------------------------------------


def test_create_stores_only_hash(token_path):
    token, record = create_token(token_path, "ci", Scope.WRITE)

    text = token_path.read_text(encoding="utf-8")
    assert token not in text
    assert token[len("voxa_") :] not in text
    entry = json.loads(text)["tokens"][0]
    assert entry["sha256"] == hashlib.sha256(token.encode()).hexdigest()
    assert set(entry) == {"id", "name", "scope", "sha256", "created", "revoked"}
    assert entry["id"] == record.id
    assert record.id.startswith("tok-")
    assert len(record.id) == 12
    assert entry["scope"] == "write"
    assert entry["revoked"] is None


def test_token_file_mode_0600(token_path):
    old_umask = os.umask(0o000)
    try:
        create_token(token_path, "ci", Scope.READ)
    finally:
        os.umask(old_umask)

    assert stat.S_IMODE(token_path.stat().st_mode) == 0o600


def test_token_file_mode_0600_after_revoke(token_path):
    create_token(token_path, "ci", Scope.READ)
    os.chmod(token_path, 0o644)

    revoke_token(token_path, "ci")

    assert stat.S_IMODE(token_path.stat().st_mode) == 0o600


def test_create_list_revoke(token_path):
    _, first = create_token(token_path, "ci", Scope.WRITE)
    _, second = create_token(token_path, "dashboard", Scope.READ)

    records = read_token_file(token_path)
    assert [record.id for record in records] == [first.id, second.id]
    assert all(record.active for record in records)

    revoked, revoked_now = revoke_token(token_path, first.id)
    assert revoked_now is True
    assert revoked.revoked_at is not None
    records = read_token_file(token_path)
    assert records[0].active is False
    assert records[1].active is True


def test_revoke_by_name(token_path):
    _, record = create_token(token_path, "dashboard", Scope.READ)

    revoked, revoked_now = revoke_token(token_path, "dashboard")

    assert revoked_now is True
    assert revoked.id == record.id


def test_revoke_twice_leaves_file_unchanged(token_path):
    _, record = create_token(token_path, "ci", Scope.READ)
    revoke_token(token_path, record.id)
    before = token_path.stat()

    again, revoked_now = revoke_token(token_path, record.id)

    assert revoked_now is False
    assert again.revoked_at is not None
    after = token_path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_revoke_unknown_token(token_path):
    create_token(token_path, "ci", Scope.READ)

    with pytest.raises(TokenUsageError, match="no token has the id or name"):
        revoke_token(token_path, "tok-00000000")


def test_active_name_must_be_unique(token_path):
    create_token(token_path, "ci", Scope.READ)

    with pytest.raises(TokenUsageError, match="already named ci"):
        create_token(token_path, "ci", Scope.WRITE)


def test_name_reused_after_revoke(token_path):
    _, old = create_token(token_path, "ci", Scope.READ)
    revoke_token(token_path, "ci")
    _, new = create_token(token_path, "ci", Scope.WRITE)

    revoked, revoked_now = revoke_token(token_path, "ci")

    assert revoked_now is True
    assert revoked.id == new.id
    assert old.id != new.id


@pytest.mark.parametrize(
    "name", ["", " ", "has space", "-leading-dash", "x" * 65, "tab\tname", "tok-0123abcd", "é"]
)
def test_invalid_token_names(token_path, name):
    with pytest.raises(TokenUsageError, match="invalid token name"):
        create_token(token_path, name, Scope.READ)
    assert not token_path.exists()


def test_parse_scope_rejects_unknown():
    assert tokens.parse_scope("admin") is Scope.ADMIN
    with pytest.raises(TokenUsageError, match="must be one of read, write, admin"):
        tokens.parse_scope("root")


def test_missing_token_file_is_empty(token_path):
    assert read_token_file(token_path) == []


VALID_ENTRY = {
    "id": "tok-0123abcd",
    "name": "ci",
    "scope": "read",
    "sha256": "a" * 64,
    "created": "2025-01-01T00:00:00Z",
    "revoked": None,
}

BAD_FILE_CASES = [
    # (case id, file text, expected part of the message)
    ("not json", "{", "invalid token file"),
    ("not an object", "[]", "expected a JSON object"),
    ("wrong schema", json.dumps({"schema_version": 2, "tokens": []}), "schema_version is 2"),
    ("tokens not a list", json.dumps({"schema_version": 1, "tokens": {}}), "tokens must be a list"),
    (
        "bad id",
        json.dumps({"schema_version": 1, "tokens": [{**VALID_ENTRY, "id": "x"}]}),
        "entry 1: id",
    ),
    (
        "bad scope",
        json.dumps({"schema_version": 1, "tokens": [{**VALID_ENTRY, "scope": "root"}]}),
        "scope of tok-0123abcd",
    ),
    (
        "bad hash",
        json.dumps({"schema_version": 1, "tokens": [{**VALID_ENTRY, "sha256": "zz"}]}),
        "sha256 of tok-0123abcd",
    ),
    (
        "bad revoked",
        json.dumps({"schema_version": 1, "tokens": [{**VALID_ENTRY, "revoked": 5}]}),
        "revoked of tok-0123abcd",
    ),
    (
        "duplicate id",
        json.dumps({"schema_version": 1, "tokens": [VALID_ENTRY, VALID_ENTRY]}),
        "appears twice",
    ),
    ("not utf-8", b"\xff\xfe".decode("latin-1"), "cannot read the token file"),
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [case[1:] for case in BAD_FILE_CASES],
    ids=[case[0] for case in BAD_FILE_CASES],
)
def test_bad_token_file_raises(token_path, text, expected):
    token_path.write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())

    with pytest.raises(TokenFileError) as raised:
        read_token_file(token_path)

    assert expected in str(raised.value)
    assert str(token_path) in str(raised.value)


def test_write_replaces_file_atomically(token_path):
    create_token(token_path, "first", Scope.READ)
    inode_before = token_path.stat().st_ino

    create_token(token_path, "second", Scope.READ)

    # os.replace puts a new file in place: the old inode is gone, no temporary file remains.
    assert token_path.stat().st_ino != inode_before
    leftovers = sorted(path.name for path in token_path.parent.iterdir())
    assert leftovers == ["tokens.json", "tokens.json.lock"]


def test_failed_write_keeps_old_file(token_path, monkeypatch):
    create_token(token_path, "first", Scope.READ)
    before = token_path.read_bytes()

    def failing_replace(source, destination):
        raise OSError(28, "No space left on device")

    # Fault injection: the rename is the step that makes the new file visible.
    monkeypatch.setattr(tokens.os, "replace", failing_replace)
    with pytest.raises(TokenFileError, match="No space left on device"):
        create_token(token_path, "second", Scope.READ)

    assert token_path.read_bytes() == before
    leftovers = sorted(path.name for path in token_path.parent.iterdir())
    assert leftovers == ["tokens.json", "tokens.json.lock"]


def test_concurrent_reader_never_sees_partial_file(token_path):
    create_token(token_path, "seed", Scope.READ)
    records = read_token_file(token_path)
    stop = threading.Event()
    errors: list[Exception] = []

    def rewrite() -> None:
        count = 0
        while not stop.is_set() and count < CONCURRENT_READS * 10:
            write_token_file(token_path, records)
            count += 1

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        for _ in range(CONCURRENT_READS):
            try:
                assert len(read_token_file(token_path)) == 1
            except (TokenFileError, AssertionError) as error:
                errors.append(error)
    finally:
        stop.set()
        writer.join()

    assert errors == []


def test_concurrent_creates_keep_every_token(token_path):
    names = [f"client-{number}" for number in range(8)]
    threads = [
        threading.Thread(target=create_token, args=(token_path, name, Scope.READ)) for name in names
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(record.name for record in read_token_file(token_path)) == names


# --- the daemon's TokenStore ------------------------------------------------------------


def test_store_reads_created_and_revoked_tokens(token_path):
    store = TokenStore(token_path)
    store.refresh()
    assert store.active_count == 0

    token, record = create_token(token_path, "ci", Scope.WRITE)
    assert store.find(token) is None
    store.refresh()
    assert store.find(token) == record
    assert store.active_count == 1

    revoke_token(token_path, record.id)
    store.refresh()
    found = store.find(token)
    assert found is not None
    assert found.active is False
    assert store.active_count == 0


def test_store_refresh_if_due_waits_for_interval(token_path):
    interval_seconds = 0.3
    token, record = create_token(token_path, "ci", Scope.WRITE)
    store = TokenStore(token_path, check_interval_seconds=interval_seconds)
    store.refresh_if_due()
    assert store.find(token).active is True

    revoke_token(token_path, record.id)
    store.refresh_if_due()
    assert store.find(token).active is True, "checked the file again within the interval"

    time.sleep(interval_seconds + 0.05)
    store.refresh_if_due()
    assert store.find(token).active is False


def test_scope_rank_order():
    assert [scope.rank for scope in Scope] == [0, 1, 2]


def test_store_unknown_token_not_found(token_path):
    create_token(token_path, "ci", Scope.WRITE)
    store = TokenStore(token_path)
    store.refresh()

    assert store.find(new_token()) is None


def test_store_skips_read_when_stat_unchanged(token_path):
    token, _ = create_token(token_path, "ci", Scope.WRITE)
    store = TokenStore(token_path)
    store.refresh()
    before = token_path.stat()

    # The same size, inode and modification time: refresh must not read the new bytes.
    token_path.write_text("x" * before.st_size, encoding="utf-8")
    os.utime(token_path, ns=(before.st_atime_ns, before.st_mtime_ns))
    store.refresh()

    assert store.find(token) is not None


def test_store_keeps_tokens_when_file_breaks(token_path, caplog):
    token, _ = create_token(token_path, "ci", Scope.WRITE)
    store = TokenStore(token_path)
    store.refresh()

    token_path.write_text('{"schema_version": 1, "tokens": [', encoding="utf-8")
    with caplog.at_level(logging.DEBUG, logger="voxanode.tokens"):
        store.refresh()
        store.refresh()

    assert store.find(token) is not None
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "invalid token file" in errors[0].getMessage()
    assert "keeping the 1 active tokens" in errors[0].getMessage()
    assert token not in caplog.text


def test_store_reads_file_again_once_fixed(token_path):
    token, _ = create_token(token_path, "ci", Scope.WRITE)
    good = token_path.read_text(encoding="utf-8")
    store = TokenStore(token_path)
    store.refresh()
    token_path.write_text("{", encoding="utf-8")
    store.refresh()

    token_path.write_text(good, encoding="utf-8")
    revoke_token(token_path, "ci")
    store.refresh()

    found = store.find(token)
    assert found is not None
    assert found.active is False


def test_store_forgets_tokens_when_file_removed(token_path):
    token, _ = create_token(token_path, "ci", Scope.WRITE)
    store = TokenStore(token_path)
    store.refresh()

    token_path.unlink()
    store.refresh()

    assert store.find(token) is None
    assert store.active_count == 0


def test_store_find_compares_every_entry(token_path, monkeypatch):
    created = [create_token(token_path, f"client-{number}", Scope.READ) for number in range(5)]
    store = TokenStore(token_path)
    store.refresh()
    real_compare = tokens.hmac.compare_digest
    compared: list[bytes] = []

    def counting_compare(left, right):
        compared.append(left)
        return real_compare(left, right)

    monkeypatch.setattr(tokens.hmac, "compare_digest", counting_compare)
    first_token, first_record = created[0]
    assert store.find(first_token) == first_record
    assert compared == [hash_token(token) for token, _ in created]

    compared.clear()
    assert store.find(new_token()) is None
    assert len(compared) == len(created)


# --- the auth middleware, in-process ----------------------------------------------------


class SettingsOnlyNode:
    """The one part of the node that the auth middleware reads: its settings."""

    def __init__(self, settings: Settings):
        self.settings = settings


async def answer_ok(request: web.Request) -> web.Response:
    return web.json_response({"success": True})


@pytest.fixture
async def serve_auth(tmp_path):
    """Serve a small app with the auth middleware; return a client for it."""
    clients = []

    async def serve(dev: bool = False, with_setup: bool = True) -> TestClient:
        settings = Settings(data_dir=tmp_path, dev=dev)
        app = web.Application(middlewares=(build_api_middleware((check_token,)),))
        app[NODE_KEY] = SettingsOnlyNode(settings)
        app[STATS_KEY] = RequestStats()
        if with_setup:
            setup_auth(app, settings)
        app.router.add_get("/status/health", answer_ok)
        app.router.add_get("/status/system", answer_ok)
        app.router.add_post("/data/store/", answer_ok)
        app.router.add_post("/internal/sync/push", answer_ok)
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield serve
    for client in clients:
        await client.close()


async def test_auth_scopes_in_process(serve_auth, tmp_path):
    reader, _ = create_token(token_file_path(tmp_path), "reader", Scope.READ)
    writer, _ = create_token(token_file_path(tmp_path), "writer", Scope.WRITE)
    client = await serve_auth()

    cases = [
        # (method, path, token, expected status)
        ("GET", "/status/health", None, 200),
        ("HEAD", "/status/health", None, 200),
        ("POST", "/internal/sync/push", None, 200),
        ("GET", "/status/system", None, 401),
        ("GET", "/status/system", reader, 200),
        ("POST", "/data/store/", reader, 403),
        ("POST", "/data/store/", writer, 200),
        ("GET", "/status/system", writer, 200),
    ]
    for method, path, token, expected in cases:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with client.request(method, path, headers=headers) as response:
            assert response.status == expected, (method, path, token is not None)


async def test_auth_off_in_dev_mode(serve_auth):
    client = await serve_auth(dev=True)

    async with client.post("/data/store/") as response:
        assert response.status == 200


async def test_auth_fails_closed_without_setup(serve_auth):
    client = await serve_auth(with_setup=False)

    async with client.get("/status/system") as response:
        body = await response.json()

    assert response.status == 500
    assert body["error"]["code"] == "INTERNAL_ERROR"


# --- the `voxanode token` command -------------------------------------------------------


def run_token_command(capsys, *args: str) -> tuple[int, str, str]:
    status = main(["token", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_cli_create_prints_token_last(tmp_path, capsys, monkeypatch):
    clean_environment(monkeypatch)
    data_dir = tmp_path / "node-data"

    status, out, err = run_token_command(
        capsys, "create", "--scope", "read", "--name", "ci", "--data-dir", str(data_dir)
    )

    assert status == 0, err
    token = out.splitlines()[-1]
    assert is_well_formed_token(token)
    assert token not in err
    stored = read_token_file(data_dir / "tokens.json")
    assert stored[0].sha256 == hash_token(token).hex()
    assert stored[0].id in err


def test_cli_uses_data_dir_from_environment(tmp_path, capsys, monkeypatch):
    clean_environment(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VOXA_DATA_DIR", "from-env")

    status, _, err = run_token_command(capsys, "create", "--scope", "write", "--name", "ci")

    assert status == 0, err
    assert read_token_file(tmp_path / "from-env" / "tokens.json")[0].name == "ci"


def test_cli_uses_data_dir_from_settings_file(tmp_path, capsys, monkeypatch):
    clean_environment(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "node.json").write_text('{"data_dir": "from-file"}', encoding="utf-8")

    status, _, err = run_token_command(
        capsys, "create", "--scope", "admin", "--name", "ci", "--config", "node.json"
    )

    assert status == 0, err
    assert read_token_file(tmp_path / "from-file" / "tokens.json")[0].scope is Scope.ADMIN


def test_cli_default_data_dir(tmp_path, capsys, monkeypatch):
    clean_environment(monkeypatch)
    monkeypatch.chdir(tmp_path)

    status, _, err = run_token_command(capsys, "create", "--scope", "read", "--name", "ci")

    assert status == 0, err
    assert (tmp_path / "data" / "tokens.json").is_file()


def test_cli_list_never_shows_token_or_hash(tmp_path, capsys, monkeypatch):
    clean_environment(monkeypatch)
    data_dir = str(tmp_path)
    _, out, _ = run_token_command(
        capsys, "create", "--scope", "read", "--name", "ci", "--data-dir", data_dir
    )
    token = out.splitlines()[-1]
    digest = hash_token(token).hex()

    status, table, _ = run_token_command(capsys, "list", "--data-dir", data_dir)
    json_status, listing, _ = run_token_command(capsys, "list", "--json", "--data-dir", data_dir)

    assert status == 0
    assert json_status == 0
    for output in (table, listing):
        assert token not in output
        assert digest not in output
    entries = json.loads(listing)
    assert len(entries) == 1
    assert set(entries[0]) == {"id", "name", "scope", "created", "revoked"}
    assert entries[0]["name"] == "ci"
    assert table.splitlines()[0].split() == ["ID", "NAME", "SCOPE", "CREATED", "REVOKED"]
    assert entries[0]["id"] in table.splitlines()[1]


def test_cli_list_empty(tmp_path, capsys, monkeypatch):
    clean_environment(monkeypatch)

    status, out, err = run_token_command(capsys, "list", "--json", "--data-dir", str(tmp_path))

    assert status == 0
    assert json.loads(out) == []


def test_cli_revoke_by_id_and_name(tmp_path, capsys, monkeypatch):
    clean_environment(monkeypatch)
    data_dir = str(tmp_path)
    run_token_command(
        capsys, "create", "--scope", "read", "--name", "first", "--data-dir", data_dir
    )
    run_token_command(
        capsys, "create", "--scope", "read", "--name", "second", "--data-dir", data_dir
    )
    first_id = read_token_file(tmp_path / "tokens.json")[0].id

    by_id = run_token_command(capsys, "revoke", first_id, "--data-dir", data_dir)
    by_name = run_token_command(capsys, "revoke", "second", "--data-dir", data_dir)

    assert by_id[0] == 0
    assert f"revoked token {first_id}" in by_id[1]
    assert by_name[0] == 0
    _, listing, _ = run_token_command(capsys, "list", "--json", "--data-dir", data_dir)
    assert all(entry["revoked"] is not None for entry in json.loads(listing))


CLI_USAGE_ERRORS = [
    # (case id, arguments after `token`, expected part of the stderr line)
    ("unknown scope", ["create", "--scope", "root", "--name", "ci"], "invalid choice: 'root'"),
    ("missing name", ["create", "--scope", "read"], "--name"),
    ("missing scope", ["create", "--name", "ci"], "--scope"),
    ("invalid name", ["create", "--scope", "read", "--name", "two words"], "invalid token name"),
    ("unknown token", ["revoke", "tok-00000000"], "no token has the id or name"),
    ("no command", [], "create,list,revoke"),
    ("unknown command", ["rotate"], "invalid choice: 'rotate'"),
    ("bad setting", ["list", "--config", "missing.json"], "config_file"),
]


@pytest.mark.parametrize(
    ("args", "expected"),
    [case[1:] for case in CLI_USAGE_ERRORS],
    ids=[case[0] for case in CLI_USAGE_ERRORS],
)
def test_cli_usage_errors_exit_2(tmp_path, capsys, monkeypatch, args, expected):
    clean_environment(monkeypatch)
    monkeypatch.chdir(tmp_path)

    status, out, err = run_token_command(capsys, *args)

    assert status == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("voxanode token")
    assert expected in lines[0]


def test_cli_broken_file_exits_1(tmp_path, capsys, monkeypatch):
    clean_environment(monkeypatch)
    (tmp_path / "tokens.json").write_text("{", encoding="utf-8")

    status, out, err = run_token_command(capsys, "list", "--data-dir", str(tmp_path))

    assert status == 1
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("voxanode token: error: invalid token file ")


def test_cli_duplicate_name_exits_2(tmp_path, capsys, monkeypatch):
    clean_environment(monkeypatch)
    data_dir = str(tmp_path)
    run_token_command(capsys, "create", "--scope", "read", "--name", "ci", "--data-dir", data_dir)

    status, out, err = run_token_command(
        capsys, "create", "--scope", "read", "--name", "ci", "--data-dir", data_dir
    )

    assert status == 2
    assert out == ""
    assert "already named ci" in err


def test_cli_entry_point_as_process(tmp_path):
    environ = {name: value for name, value in os.environ.items() if not name.startswith("VOXA_")}
    environ["PYTHONPATH"] = str(REPO_ROOT)
    command = [
        sys.executable,
        "-m",
        "voxanode",
        "token",
        "create",
        "--scope",
        "write",
        "--name",
        "ci",
        "--data-dir",
        str(tmp_path),
    ]

    completed = subprocess.run(
        command,
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr
    assert is_well_formed_token(completed.stdout.splitlines()[-1])


def test_daemon_refuses_broken_token_file(tmp_path):
    environ = {name: value for name, value in os.environ.items() if not name.startswith("VOXA_")}
    environ["PYTHONPATH"] = str(REPO_ROOT)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tokens.json").write_text("[]", encoding="utf-8")
    command = [sys.executable, "-m", "voxanode", "--api-port", "1", "--peer-port", "1"]

    completed = subprocess.run(
        command,
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
        check=False,
    )

    assert completed.returncode == 2
    error_lines = [
        line for line in completed.stderr.splitlines() if line.startswith("voxanode: error:")
    ]
    assert len(error_lines) == 1, completed.stderr
    assert "invalid token file" in error_lines[0]
    assert "tokens.json" in error_lines[0]
