"""Sampling of this machine's load for membership announcements and placement."""

import os

import psutil

from voxanode.membership.state import NodeLoad

BYTES_PER_MIB = 1024 * 1024


def sample_load(active_apps: int = 0) -> NodeLoad:
    """Return the machine's CPU and memory use now, and the room left for apps.

    CPU use is measured since the previous call (psutil keeps the last reading), so
    the first call after start reports 0.
    """
    cpu_percent = psutil.cpu_percent(interval=None)
    memory = psutil.virtual_memory()
    cores = os.cpu_count() or 1
    return NodeLoad(
        cpu_percent=cpu_percent,
        memory_percent=memory.percent,
        active_apps=active_apps,
        memory_free_mb=int(memory.available // BYTES_PER_MIB),
        cpu_free_cores=max(0.0, cores * (1 - cpu_percent / 100)),
        cpu_cores=cores,
    )
