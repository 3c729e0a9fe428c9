"""Shared fixtures: real multi-node devnets per test, and the collected-test count check.

`devnet_factory` builds voxanode.devnet.Devnet networks under the test's tmp_path, each
on its own random loopback block (127.A.B.1.., A >= 10) with ports bind-tested free, so
tests never collide with each other or with a developer's devnet on 127.0.0.2+. Every
devnet is stopped at teardown. When the test failed, each node's log tail is added to
the failure report.

On a full run (plain `pytest`, no -k/-m/--lf/--deselect/--ignore and no paths), the run
fails when fewer tests were collected than tests/expected_test_count.txt records, so a
test module that stops being collected cannot go unnoticed.
"""

import random
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent
# Test modules import the shared helpers as `helpers`, whatever pytest's import mode.
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from helpers import FAST_DAEMON_ARGS, TEST_IMAGE  # noqa: E402
from voxanode.devnet import Devnet, allocate_free_block  # noqa: E402

# Extra addresses bind-tested beyond the initial size, for tests that call add_node().
SPARE_ADDRESS_COUNT = 2
FAILURE_LOG_TAIL_LINES = 60
EXPECTED_COUNT_PATH = TESTS_DIR / "expected_test_count.txt"
COUNT_SHORTFALL_KEY = pytest.StashKey[str]()


# --- per-phase reports on the test item ----------------------------------------------


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Keep each phase's report on the item as rep_setup / rep_call / rep_teardown."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def failed_report(item: pytest.Item) -> pytest.TestReport | None:
    """Return the setup or call report of `item` if that phase failed."""
    for phase in ("rep_call", "rep_setup"):
        report = getattr(item, phase, None)
        if report is not None and report.failed:
            return report
    return None


# --- devnets --------------------------------------------------------------------------


class DevnetFactory(Protocol):
    def __call__(
        self,
        size: int = 3,
        *,
        extra_args: Sequence[str] = (),
        fast: bool = True,
        start: bool = True,
        bootstrap_count: int = 1,
        ready_timeout: float = 60.0,
    ) -> Devnet: ...


@pytest.fixture
def devnet_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DevnetFactory]:
    """Build devnets on unique loopback blocks; every one is stopped at teardown.

    Call it as `devnet_factory(3)`. With `fast=False` the daemons get only --dev, not the
    short test intervals. With `start=False` the Devnet is returned unstarted.
    `extra_args` go to every daemon after the fast ones.
    """
    created: list[Devnet] = []
    rng = random.Random()

    def build(
        size: int = 3,
        *,
        extra_args: Sequence[str] = (),
        fast: bool = True,
        start: bool = True,
        bootstrap_count: int = 1,
        ready_timeout: float = 60.0,
    ) -> Devnet:
        block = allocate_free_block(size + SPARE_ADDRESS_COUNT, rng)
        daemon_args = list(FAST_DAEMON_ARGS if fast else ("--dev",)) + list(extra_args)
        devnet = Devnet(
            size,
            tmp_path / f"devnet-{len(created)}",
            first_address=block.first_address,
            api_port=block.api_port,
            peer_port=block.peer_port,
            extra_args=daemon_args,
            bootstrap_count=bootstrap_count,
            ready_timeout=ready_timeout,
        )
        created.append(devnet)
        if start:
            devnet.start()
        return devnet

    yield build

    for devnet in created:
        devnet.stop()
    report = failed_report(request.node)
    if report is not None:
        for number, devnet in enumerate(created):
            report.sections.append((f"devnet {number} node logs", devnet.log_tails(FAILURE_LOG_TAIL_LINES)))


# --- the app test image ----------------------------------------------------------------


@pytest.fixture(scope="session")
def test_image() -> str:
    """Build the local app test image once per session (no registry) and return its tag.

    A missing Docker engine fails the tests that use it: the app tests never skip.
    """
    completed = subprocess.run(
        [str(REPO_DIR / "scripts" / "build-test-image")], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, (
        "the test image could not be built; start dockerd and install busybox-static: "
        + completed.stderr[-2000:]
    )
    return TEST_IMAGE


# --- collected test count --------------------------------------------------------------


def is_full_run(config: pytest.Config) -> bool:
    """Return whether this run collects the whole suite: default paths, nothing filtered out."""
    if config.args_source != pytest.Config.ArgsSource.TESTPATHS:
        return False
    filters = ("keyword", "markexpr", "lf", "deselect", "ignore", "ignore_glob")
    return not any(config.getoption(name, default=None) for name in filters)


def read_expected_count(path: Path) -> int:
    """Return the integer in `path`; lines starting with # are comments."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    numbers = [line for line in lines if line and not line.startswith("#")]
    if len(numbers) != 1 or not numbers[0].isdigit():
        raise pytest.UsageError(f"{path} must contain one non-negative integer, found {numbers!r}")
    return int(numbers[0])


def pytest_collection_finish(session: pytest.Session) -> None:
    """Record a shortfall when a full run collected fewer tests than expected."""
    config = session.config
    if not is_full_run(config):
        return
    if not EXPECTED_COUNT_PATH.exists():
        config.stash[COUNT_SHORTFALL_KEY] = f"{EXPECTED_COUNT_PATH} is missing; write the expected number of tests into it"
        return
    expected = read_expected_count(EXPECTED_COUNT_PATH)
    collected = len(session.items)
    if collected < expected:
        config.stash[COUNT_SHORTFALL_KEY] = (
            f"collected {collected} tests, expected at least {expected} ({EXPECTED_COUNT_PATH}): "
            "a test module may have stopped being collected"
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when the collected count fell short."""
    if COUNT_SHORTFALL_KEY in session.config.stash and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Print the collected-count shortfall, if any, above the final summary line."""
    message = config.stash.get(COUNT_SHORTFALL_KEY, None)
    if message:
        terminalreporter.section("collected test count", red=True, bold=True)
        terminalreporter.write_line(f"FAILED: {message}", red=True)
