"""Processes as /proc shows them (Linux): what runs below a process, and its command line. Used
by the fault tests, the local-Ray dashboard test and benchmarks/bench_ray_start.py."""

from __future__ import annotations

import os


def descendants(pid: int) -> list[int]:
    """PIDs of every process below ``pid`` (from /proc), e.g. the Ray processes a driver started."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii") as stat:
                    children.setdefault(int(stat.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except FileNotFoundError:
                pass
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    """The command line of ``pid``, arguments joined by spaces ("" once it has gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return ""
