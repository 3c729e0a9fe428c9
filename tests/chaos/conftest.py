"""Fixtures of the chaos suite: one shared 5-node devnet, the runner, and the final report.

The default (CI) mode runs a fixed, seeded set of plans. `--chaos-long` runs more
plans and rounds for a manual run; it is registered here, so pass it together with
the path: `pytest tests/chaos --chaos-long`. The figures of the run are printed in the
terminal summary and written to test-artifacts/chaos-report.json.
"""

import dataclasses
import json
import random
import sys
from pathlib import Path
from typing import Iterator

import pytest

CHAOS_DIR = Path(__file__).resolve().parent
if str(CHAOS_DIR) not in sys.path:
    sys.path.insert(0, str(CHAOS_DIR))

from faults import iptables_available, remove_stale_chains  # noqa: E402
from harness import ChaosReport, ChaosRunner, sample_rss  # noqa: E402
from helpers import FAST_DAEMON_ARGS, wait_for  # noqa: E402
from invariants import views_converged  # noqa: E402
from voxanode.devnet import Devnet, allocate_free_block  # noqa: E402

NODES = 5
CHAOS_SEED = 20240611
REPORT_KEY = pytest.StashKey[ChaosReport]()
REPORT_PATH = CHAOS_DIR.parent.parent / "test-artifacts" / "chaos-report.json"
# App loops run often enough that a lost instance is replaced within a test's time.
APP_ARGS = (
    "--apps-reconcile-interval-seconds", "1",
    "--apps-stats-interval-seconds", "5",
    "--apps-sync-interval-seconds", "2",
    "--apps-stop-timeout-seconds", "2",
)
# Push-pull also reconnects members declared dead, so it bounds how long the two sides
# of a healed partition keep listing each other offline.
MEMBERSHIP_ARGS = ("--push-pull-interval-seconds", "3")
CONVERGE_SECONDS = 30


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--chaos-long",
        action="store_true",
        default=False,
        help="chaos suite: run the long plan set with more rounds (minutes, for manual runs)",
    )


def chaos_long(config: pytest.Config) -> bool:
    return bool(config.getoption("--chaos-long", default=False))


def chaos_report(config: pytest.Config) -> ChaosReport:
    if REPORT_KEY not in config.stash:
        config.stash[REPORT_KEY] = ChaosReport()
    return config.stash[REPORT_KEY]


@pytest.fixture(scope="session")
def report(pytestconfig) -> ChaosReport:
    return chaos_report(pytestconfig)


@pytest.fixture(scope="session")
def chaos_network(tmp_path_factory) -> Iterator[Devnet]:
    """Five nodes with apps enabled, shared by every chaos module and stopped at the end."""
    assert iptables_available(), "the chaos suite needs root and iptables"
    remove_stale_chains()
    block = allocate_free_block(NODES + 1, random.Random())
    devnet = Devnet(
        NODES,
        tmp_path_factory.mktemp("chaos-devnet"),
        first_address=block.first_address,
        api_port=block.api_port,
        peer_port=block.peer_port,
        extra_args=list(FAST_DAEMON_ARGS) + list(APP_ARGS) + list(MEMBERSHIP_ARGS),
        bootstrap_count=2,
    )
    devnet.start()
    try:
        ids = {node.fetch_node_id() for node in devnet.nodes}
        assert wait_for(lambda: views_converged(devnet.nodes, ids), CONVERGE_SECONDS) is True
        devnet.rss_baseline = sample_rss(devnet)
        yield devnet
    finally:
        devnet.stop()


@pytest.fixture(scope="session")
def runner(chaos_network, report) -> Iterator[ChaosRunner]:
    chaos_runner = ChaosRunner(chaos_network, report, CHAOS_SEED)
    try:
        yield chaos_runner
    finally:
        chaos_runner.close()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Print the chaos figures and write them as JSON, when a chaos test ran."""
    if REPORT_KEY not in config.stash:
        return
    report = config.stash[REPORT_KEY]
    terminalreporter.section("chaos report")
    for line in report.lines():
        terminalreporter.write_line(line)
    REPORT_PATH.parent.mkdir(parents=True, exist_ok=True)
    REPORT_PATH.write_text(json.dumps(dataclasses.asdict(report), indent=2) + "\n", encoding="utf-8")
    terminalreporter.write_line(f"written to {REPORT_PATH}")
