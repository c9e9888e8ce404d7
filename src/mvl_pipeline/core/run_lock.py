"""One writer per data root: the lock every ``kedro run`` that writes data takes first.

Two runs writing one data root at once would interleave their saves: two ingests both appending
to the manifest, a preprocess rewriting cases that a fit is reading, two fits resuming one Ray
run. So a run that writes data (``hooks.RunLockHook``) first takes an exclusive ``flock`` on
``<data_root>/.run.lock`` (``filelock``'s native Unix lock) and holds it until the run ends.

- **Stale locks recover by themselves.** The kernel drops a ``flock`` when its holder's process
  ends for any reason, SIGKILL and OOM kill included, so a dead run never blocks the next one.
  What a killed run leaves is its holder record in the file; the next run reports it ("recovered
  the run lock of PID ..."). Its outputs are whole or absent (every save is atomic, see
  ``core.storage``) and the rerun redoes what it left undone. The record also holds the dead
  run's MLflow run id once it had one (``note``), so the next run marks that run KILLED instead
  of leaving it RUNNING for ever (``hooks.KilledRunHook``).
- **A second run waits or refuses**, as ``run.lock`` says (``conf/base/parameters_run.yml``):
  ``wait`` logs whom it waits for and waits up to ``run.lock_timeout_s``; ``refuse`` fails at
  once. Either way the message names the holder by PID, host, pipeline and start time, never by a
  path (a hospital's folder names may carry identity).
- **An ``s3://`` data root** holds a lease object on the store instead (``core.s3_lock``): it
  orders the runs of every machine. Other remote roots cannot hold a ``flock``: their lock is a
  local file keyed by the root's URL under the project's ``data/`` folder, so it orders the runs
  of one machine only.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, ClassVar

from filelock import FileLock, Timeout
from kedro.io.core import get_protocol_and_path

from mvl_pipeline.core.config import ConfigBlock

logger = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"
LOCK_MODES = ("wait", "refuse")
#: While waiting, a reminder is logged this often (seconds).
REMIND_EVERY_S = 60.0


@dataclasses.dataclass(frozen=True)
class RunConfig(ConfigBlock):
    """The ``run`` block: what a run does when another run holds the data root, and how its MLflow
    run shows it is alive (``core.run_heartbeat``)."""

    WHERE: ClassVar[str] = "run"

    lock: str = "wait"
    lock_timeout_s: float = 3600.0
    heartbeat_s: float = 60.0
    stale_after_s: float = 900.0

    def __post_init__(self) -> None:
        if self.lock not in LOCK_MODES:
            raise ValueError(f"run.lock must be one of {LOCK_MODES}, got {self.lock!r}")
        if not self.lock_timeout_s > 0:
            raise ValueError(f"run.lock_timeout_s must be > 0, got {self.lock_timeout_s}")
        if not self.heartbeat_s > 0:
            raise ValueError(f"run.heartbeat_s must be > 0, got {self.heartbeat_s}")
        if not self.stale_after_s >= 3 * self.heartbeat_s:
            raise ValueError(f"run.stale_after_s must be at least 3 heartbeats ({3 * self.heartbeat_s:.0f} s), "
                             f"got {self.stale_after_s}")  # fmt: skip


class RunLockedError(RuntimeError):
    """Another run holds the data root: refused (``run.lock: refuse``) or waited too long."""


def local_root(data_root: str, project_path: str | os.PathLike[str]) -> Path | None:
    """The local folder of ``data_root`` (relative roots are the project's); ``None`` if remote."""
    protocol, path = get_protocol_and_path(str(data_root))
    if protocol != "file":
        return None
    root = Path(path)
    return root if root.is_absolute() else Path(project_path) / root


def lock_path(data_root: str, project_path: str | os.PathLike[str]) -> Path:
    """The lock file of ``data_root``: in the folder itself, or keyed by a remote root's URL."""
    root = local_root(data_root, project_path)
    if root is not None:
        return root / LOCK_FILE
    digest = hashlib.sha256(str(data_root).rstrip("/").encode()).hexdigest()[:16]
    return Path(project_path) / "data" / f".run-{digest}.lock"


def holder_record(pipeline: str) -> dict[str, Any]:
    """Who holds the lock: PID, host, pipeline, start time (UTC). No path, no PHI."""
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return {"pid": os.getpid(), "host": socket.gethostname(), "pipeline": pipeline, "started": started}


def describe(record: dict[str, Any] | None) -> str:
    if not record:
        return "a run that has not written its record yet"
    return (
        f"PID {record.get('pid')} on host {record.get('host')} "
        f"(pipeline {record.get('pipeline')!r}, started {record.get('started')})"
    )


def refused(holder: str) -> str:
    return (f"another run writes this project's data: {holder}. Not starting (run.lock is 'refuse'); "
            f"run again when it has finished, or set run.lock: wait.")  # fmt: skip


def gave_up(timeout: float, holder: str) -> str:
    return f"gave up after waiting {timeout:.0f} s (run.lock_timeout_s) for the run lock held by {holder}"


def parse_record(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw.decode("utf-8")) if raw.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


class RunLock:
    """The run lock of one data root (see module doc). ``acquire()`` then ``release()``."""

    def __init__(self, path: str | os.PathLike[str], config: RunConfig, *, pipeline: str) -> None:
        self.path = Path(path)
        self.config = config
        self.pipeline = pipeline
        self.left_behind: dict[str, Any] | None = None  # the record of a run that died holding it
        self._record: dict[str, Any] = {}
        self._written = 0
        self._lock = FileLock(
            self.path,
            thread_local=False,
            preserve_lock_file=True,  # waiters share one inode; the record is read from it
            on_acquired=self._claim,
        )

    def holder(self) -> dict[str, Any] | None:
        """The record of the run holding the lock now (``None`` if unreadable or free)."""
        try:
            return parse_record(self.path.read_bytes())
        except OSError:
            return None

    def _claim(self, fd: int) -> None:
        # Runs with the flock held: a record still in the file is that of a run that ended
        # without releasing (release() clears it).
        self.left_behind = parse_record(os.pread(fd, 1 << 16, 0))
        self._record = holder_record(self.pipeline)
        record = json.dumps(self._record).encode()
        # written over the old record (padded with blanks, which JSON ignores), then cut to length:
        # truncating first left an empty record to a kill in between, and the next run learnt of no
        # dead holder (no temporaries swept, its MLflow run left RUNNING)
        os.pwrite(fd, record + b" " * max(0, os.fstat(fd).st_size - len(record)), 0)
        os.ftruncate(fd, len(record))
        self._written = len(record)

    def note(self, **fields: str) -> None:
        """Add ``fields`` (ids, no PHI) to this run's record while it holds the lock: what the run
        that recovers the lock learns if this one dies. The record is rewritten in one write,
        never truncated first (padded with blanks, which JSON ignores, to cover a longer one), so a
        kill at any moment leaves a whole record."""
        if not self._lock.is_locked:
            return
        self._record.update(fields)
        record = json.dumps(self._record).encode()
        record += b" " * max(0, self._written - len(record))
        fd = os.open(self.path, os.O_WRONLY)
        try:
            self._written = os.pwrite(fd, record, 0)
        finally:
            os.close(fd)

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(blocking=False)
            taken = True
        except Timeout:  # (filelock's message names the path: not re-raised)
            taken = False
        if not taken:
            self._wait()
        if self.left_behind is not None:
            logger.warning(
                "recovered the run lock left by %s: that run ended without releasing it (killed?). "
                "What it saved is whole (atomic saves); this run redoes what it left undone.",
                describe(self.left_behind),
            )
        logger.info("run lock taken for pipeline %r (PID %d)", self.pipeline, os.getpid())

    def _wait(self) -> None:
        holder = describe(self.holder())
        timeout = float(self.config.lock_timeout_s)
        if self.config.lock == "refuse":
            raise RunLockedError(refused(holder))
        logger.warning("another run writes this project's data: %s; waiting up to %.0f s for it to finish", holder, timeout)
        started = time.monotonic()
        while True:
            remaining = timeout - (time.monotonic() - started)
            if remaining <= 0:
                raise RunLockedError(gave_up(timeout, describe(self.holder())))
            try:
                self._lock.acquire(timeout=min(remaining, REMIND_EVERY_S), poll_interval=0.2)
            except Timeout:
                if time.monotonic() - started < timeout:
                    logger.info("still waiting for %s (%.0f s so far)", describe(self.holder()), time.monotonic() - started)
                continue
            logger.info("the other run finished: waited %.1f s", time.monotonic() - started)
            return

    def check(self) -> None:
        """A file lock cannot be lost while its process lives (``s3_lock.S3RunLock`` can)."""

    def release(self) -> None:
        """Clear the record (a cleanly ended run leaves none) and drop the lock."""
        if not self._lock.is_locked:
            return
        try:
            os.truncate(self.path, 0)
        except OSError as exc:  # the lock still goes: the next run only reports a stale record
            logger.warning("could not clear the run lock record (%s)", type(exc).__name__)
        self._lock.release(force=True)
        logger.info("run lock released")
