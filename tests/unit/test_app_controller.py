"""AppController's placement exclusions and the members that offer app deployment.

After a node-specific failure (a missing image, a lost Docker engine) the responsible
node leaves the failed node out of the app's placements for a while. A node that
withdraws app deployment and offers it again, as one whose engine came back does,
gets placements again at once.
"""

import asyncio
import time
from types import SimpleNamespace

import pytest

from voxanode.apps.catalogue import Catalogue
from voxanode.apps.controller import CAPABILITY, AppController
from voxanode.apps.peer_calls import PeerCalls
from voxanode.apps.runtime import DockerRuntime
from voxanode.events import EventBus
from voxanode.identity import Identity
from voxanode.membership.state import Change
from voxanode.settings import Settings

NODE_ID = "node-00000000000a"
OTHER_NODE_ID = "node-00000000000b"
THIRD_NODE_ID = "node-00000000000c"
APP_ID = "app-0123456789ab"
OTHER_APP_ID = "app-ba9876543210"
EXCLUSION_SECONDS = 60


def member(node_id: str, *capabilities: str) -> SimpleNamespace:
    """A member as on_member_change reads it: its node id and announced capabilities."""
    return SimpleNamespace(node_id=node_id, info=SimpleNamespace(capabilities=("storage", *capabilities)))


@pytest.fixture
def controller(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", dev=False, api_host="127.0.0.1", api_port=0)
    node = SimpleNamespace(settings=settings, node_id=NODE_ID, events=EventBus(NODE_ID), membership=None)
    catalogue = Catalogue(tmp_path / "apps.sqlite3")
    catalogue.open()
    runtime = DockerRuntime(NODE_ID, "127.0.0.1")
    app_controller = AppController(node, catalogue, runtime, PeerCalls(Identity.generate()))
    yield app_controller
    asyncio.run(runtime.close())
    catalogue.close()


def excluded_nodes(controller: AppController, app_id: str) -> set[str]:
    return set(controller._excluded_nodes.get(app_id, {}))


def test_offering_apps_again_clears_exclusions(controller):
    controller.on_member_change(member(OTHER_NODE_ID, CAPABILITY), Change.UPDATED)
    until = time.time() + EXCLUSION_SECONDS
    controller._excluded_nodes = {
        APP_ID: {OTHER_NODE_ID: until, THIRD_NODE_ID: until},
        OTHER_APP_ID: {OTHER_NODE_ID: until},
    }

    # A load update of a node that kept offering apps changes nothing.
    controller.on_member_change(member(OTHER_NODE_ID, CAPABILITY), Change.UPDATED)
    assert excluded_nodes(controller, APP_ID) == {OTHER_NODE_ID, THIRD_NODE_ID}

    controller.on_member_change(member(OTHER_NODE_ID), Change.UPDATED)
    assert excluded_nodes(controller, APP_ID) == {OTHER_NODE_ID, THIRD_NODE_ID}

    controller.on_member_change(member(OTHER_NODE_ID, CAPABILITY), Change.UPDATED)
    assert excluded_nodes(controller, APP_ID) == {THIRD_NODE_ID}
    assert excluded_nodes(controller, OTHER_APP_ID) == set()


def test_first_offer_of_a_member_clears_its_exclusions(controller):
    # A member this node never saw offering apps, such as one that started without an engine.
    controller.on_member_change(member(THIRD_NODE_ID), Change.UPDATED)
    controller._excluded_nodes = {APP_ID: {THIRD_NODE_ID: time.time() + EXCLUSION_SECONDS}}

    controller.on_member_change(member(THIRD_NODE_ID, CAPABILITY), Change.UPDATED)

    assert excluded_nodes(controller, APP_ID) == set()
