"""The app catalogue: newest record and report win, they survive a reopen, digests trade."""

import json

import pytest

from voxanode.apps.catalogue import (
    AppRecord,
    Catalogue,
    CatalogueError,
    InstanceReport,
    InstanceState,
)
from voxanode.apps.spec import SpecLimits, parse_app_spec

SPEC = parse_app_spec(
    {"name": "web", "image": "voxanode-test/httpd:latest", "replicas": 2, "ports": [{"container_port": 8080}]},
    SpecLimits(),
)


def record(version: int, writer: str = "node-aaaaaaaaaaaa", **changes) -> AppRecord:
    fields = dict(
        app_id="app-0123456789ab",
        name="web",
        spec=SPEC,
        desired=2,
        state="active",
        phase="deploying",
        assignments={"inst-000000000001": "node-aaaaaaaaaaaa"},
        created_at=1.0,
        updated_at=2.0,
        version=version,
        writer=writer,
    )
    fields.update(changes)
    return AppRecord(**fields)


def report(sequence: int, node_id: str = "node-bbbbbbbbbbbb") -> InstanceReport:
    state = InstanceState(
        instance_id="inst-000000000001", app_id="app-0123456789ab", node_id=node_id,
        status="running", health="healthy", created_at=1.0, host_ports={"8080/tcp": 32768},
    )
    return InstanceReport(node_id, sequence, {state.instance_id: state})


def test_catalogue_keeps_newest_record(tmp_path):
    catalogue = Catalogue(tmp_path / "apps.sqlite3")
    catalogue.open()
    assert catalogue.merge_app(record(2)) is not None
    assert catalogue.merge_app(record(1)) is None
    assert catalogue.merge_app(record(2)) is None
    assert catalogue.merge_app(record(2, writer="node-ffffffffffff", phase="running")) is not None
    assert catalogue.apps["app-0123456789ab"].phase == "running"


def test_records_and_reports_survive_a_reopen(tmp_path):
    path = tmp_path / "apps.sqlite3"
    catalogue = Catalogue(path)
    catalogue.open()
    catalogue.merge_app(record(3, phase="running"))
    catalogue.merge_report(report(10))
    assert not catalogue.merge_report(report(9))
    catalogue.close()

    reopened = Catalogue(path)
    reopened.open()
    assert reopened.apps["app-0123456789ab"] == record(3, phase="running")
    assert reopened.reports["node-bbbbbbbbbbbb"].sequence == 10
    assert reopened.reports["node-bbbbbbbbbbbb"].instances["inst-000000000001"].host_ports == {"8080/tcp": 32768}


def test_record_json_round_trip():
    original = record(4)
    assert AppRecord.from_dict(json.loads(json.dumps(original.to_dict()))) == original


@pytest.mark.parametrize(
    "change",
    [
        {"state": "paused"},
        {"desired": -1},
        {"assignments": {"inst-1": 5}},
        {"spec": {"name": "web"}},
        {"version": "1"},
    ],
)
def test_malformed_records_are_refused(change):
    data = record(1).to_dict()
    data.update(change)
    with pytest.raises(CatalogueError):
        AppRecord.from_dict(data)


def test_report_rejects_foreign_instances():
    data = report(1).to_dict()
    data["node_id"] = "node-cccccccccccc"
    with pytest.raises(CatalogueError, match="own node"):
        InstanceReport.from_dict(data)


def test_digests_find_what_each_side_lacks(tmp_path):
    ours = Catalogue(tmp_path / "ours.sqlite3")
    ours.open()
    ours.merge_app(record(5))
    ours.merge_report(report(7))
    theirs_digest = {
        "apps": {"app-0123456789ab": [4, "node-aaaaaaaaaaaa"], "app-ffffffffffff": [1, "node-x"]},
        "reports": {"node-bbbbbbbbbbbb": 9},
    }
    send_apps, send_reports, want_apps, want_reports = ours.newer_than(theirs_digest)
    assert [r.version for r in send_apps] == [5]
    assert send_reports == []
    assert want_apps == ["app-ffffffffffff"]
    assert want_reports == ["node-bbbbbbbbbbbb"]
    with pytest.raises(CatalogueError):
        ours.newer_than({"apps": [], "reports": {}})


def test_full_database_keeps_merges_and_saves_them_later(tmp_path, caplog):
    path = tmp_path / "apps.sqlite3"
    catalogue = Catalogue(path)
    catalogue.open()
    # SQLite raises "database or disk is full" once the file would pass max_page_count,
    # the same error as on a full disk.
    page_count = catalogue._db.execute("PRAGMA page_count").fetchone()[0]
    catalogue._db.execute(f"PRAGMA max_page_count = {page_count}")
    many_instances = {f"inst-{number:012x}": "node-aaaaaaaaaaaa" for number in range(600)}

    with caplog.at_level("WARNING", logger="voxanode.apps.catalogue"):
        for version in range(1, 4):
            assert catalogue.merge_app(record(version, phase="running", assignments=many_instances)) is not None
        assert catalogue.merge_report(report(10)) is True

    assert catalogue.apps["app-0123456789ab"].version == 3
    assert catalogue.reports["node-bbbbbbbbbbbb"].sequence == 10
    assert catalogue.unsaved_count == 2
    warnings = [entry.message for entry in caplog.records if "cannot save app records" in entry.message]
    assert len(warnings) == 1
    assert "full" in warnings[0]

    catalogue._db.execute("PRAGMA max_page_count = 1073741823")
    catalogue.merge_report(report(11))
    assert catalogue.unsaved_count == 0
    catalogue.close()

    reopened = Catalogue(path)
    reopened.open()
    assert reopened.apps["app-0123456789ab"].version == 3
    assert reopened.reports["node-bbbbbbbbbbbb"].sequence == 11
