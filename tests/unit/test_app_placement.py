"""Placement of app instances on nodes: spreading, room checks and the shortfall report."""

import pytest

from voxanode.apps.placement import NodeCapacity, PlacementError, choose_extras, place

MIB = 1024 * 1024


def node(node_id: str, free_mb: int = 4096, cores: int = 4, cpu_percent: float = 10.0, **extra) -> NodeCapacity:
    return NodeCapacity(
        node_id=node_id,
        memory_free_bytes=free_mb * MIB,
        cpu_free_cores=cores * (1 - cpu_percent / 100),
        cpu_cores=cores,
        cpu_percent=cpu_percent,
        memory_percent=20.0,
        active_apps=0,
        **extra,
    )


def test_replicas_spread_over_nodes_before_doubling_up():
    nodes = [node("a"), node("b"), node("c")]
    chosen = place(nodes, 5, 64 * MIB, 0.5)
    assert sorted(chosen[:3]) == ["a", "b", "c"]
    assert sorted(chosen) == ["a", "a", "b", "b", "c"]


def test_placement_prefers_less_loaded_node():
    nodes = [node("busy", cpu_percent=90.0), node("idle", cpu_percent=5.0)]
    assert place(nodes, 1, None, None) == ["idle"]


def test_placement_avoids_node_without_idle_cpu():
    nodes = [node("hot", cores=2, cpu_percent=99.0), node("cool", cores=2, cpu_percent=50.0)]
    assert place(nodes, 1, None, 0.5) == ["cool"]
    assert place([node("hot", cores=2, cpu_percent=99.0)], 1, None, 0.5) == ["hot"]


def test_memory_is_reserved_by_the_placement_itself():
    nodes = [node("a", free_mb=100)]
    assert place(nodes, 2, 40 * MIB, None) == ["a", "a"]
    with pytest.raises(PlacementError) as raised:
        place([node("a", free_mb=100)], 3, 40 * MIB, None)
    shortfall = raised.value.shortfall
    assert shortfall.placed == 2
    assert shortfall.wanted == 3
    assert shortfall.details()["memory_asked_mb"] == 40


def test_placement_cpu_over_cores_fails():
    with pytest.raises(PlacementError) as raised:
        place([node("a", cores=2), node("b", cores=4, free_mb=8000)], 1, None, 6.0)
    details = raised.value.shortfall.details()
    assert details["best_node_id"] == "b"
    assert details["best_node_cpu_cores"] == 4
    assert details["cpu_asked"] == 6.0
    assert "6 CPU" in str(raised.value)


def test_excluded_nodes_and_an_empty_network_place_nothing():
    with pytest.raises(PlacementError) as raised:
        place([node("a", excluded=True)], 1, None, None)
    assert raised.value.shortfall.candidates == 0
    assert "no node" in str(raised.value)


def test_extras_from_fullest_node():
    instances = {"i1": "a", "i2": "a", "i3": "b", "i4": "c"}
    assert choose_extras(instances, 1, {}) == ["i2"]
    removed = choose_extras(instances, 2, {"b": 90.0, "c": 10.0})
    assert removed[0] == "i2"
    assert removed[1] == "i3"
