"""The run lock of an ``s3://`` data root: a lease object that every machine sees.

A file lock orders the runs of one machine; two machines (a laptop and a pod, two pods started by
hand) writing one S3 data root would interleave their saves. So a run whose data root is on S3
holds the object ``<data_root>/.run.lock``, written with S3's conditional writes:

- **taken** with ``If-None-Match: *`` (only one writer can create it);
- **renewed** every ``run.heartbeat_s`` with ``If-Match: <its ETag>`` (the lease);
- **released** by deleting it with ``If-Match`` (never another run's lease; a store without
  conditional deletes gets a plain delete);
- **probed** once taken: a second create must be refused, or the store ignores the conditions;
- **taken over** when the lease has not been renewed for ``run.stale_after_s``, measured on the
  store's clock (its ``Last-Modified`` against its ``Date``), so a machine whose clock runs ahead
  cannot steal a live lease, and with ``If-Match`` on the ETag it read, so of two runs taking over
  one dead lease only one wins. The dead run's record becomes ``left_behind``, as with the file
  lock (its MLflow run is marked KILLED by ``hooks.KilledRunHook``).

A run that cannot renew its lease for ``run.stale_after_s`` (the store unreachable, the process
frozen) or finds it taken over has **lost** it: it logs an error at once and stops before its next
node (``check()``, from ``hooks.RunLockHook``); a node already running finishes its own atomic
saves. A store without conditional writes (it answers ``NotImplemented``, or the probe's second
create succeeds) gets the per-machine file lock of ``run_lock.lock_path``, with a warning. The
record holds ids only (PID, host, pipeline, start time, MLflow run id): no path, no PHI.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from mvl_pipeline.core import storage
from mvl_pipeline.core.run_lock import (
    REMIND_EVERY_S,
    RunConfig,
    RunLock,
    RunLockedError,
    describe,
    gave_up,
    holder_record,
    parse_record,
    refused,
)

logger = logging.getLogger(__name__)

LOCK_OBJECT = ".run.lock"
#: Seconds between two tries while waiting for a live lease (at most: a heartbeat is shorter).
POLL_S = 2.0
#: The store's answers to a conditional write that lost: the object changed or exists (412), or a
#: concurrent conditional write to the same key is in flight (409).
_LOST_RACE = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")
_UNSUPPORTED = ("NotImplemented", "501")


class _Unsupported(Exception):
    """The store ignores conditional writes."""


class RunLockLostError(RuntimeError):
    """This run's lease on an S3 data root lapsed or was taken over: another run may write now."""


def _code(exc: Exception) -> str:
    error = (getattr(exc, "response", None) or {}).get("Error") or {}
    return str(error.get("Code") or "")


def s3_client() -> Any:
    """A boto3 S3 client bounded like every other S3 client here (``storage.S3_RETRY``,
    ``storage.S3_TIMEOUTS``); endpoint and credentials from the environment, as s3fs and Ray read
    them (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``...)."""
    import boto3
    from botocore.config import Config

    config = Config(retries=dict(storage.S3_RETRY), **storage.S3_TIMEOUTS)
    return boto3.session.Session().client("s3", config=config)


class S3RunLock:
    """The lease of one ``s3://bucket/prefix`` data root (module doc); the interface of
    ``run_lock.RunLock``: ``acquire()``, ``note(**fields)``, ``check()``, ``release()``."""

    def __init__(self, url: str, config: RunConfig, *, pipeline: str, fallback: str, client: Any = None) -> None:
        bucket, _, prefix = url.split("://", 1)[1].partition("/")
        self.bucket = bucket
        self.key = f"{prefix.strip('/')}/{LOCK_OBJECT}" if prefix.strip("/") else LOCK_OBJECT
        self.config = config
        self.pipeline = pipeline
        self.left_behind: dict[str, Any] | None = None
        self.lost: str | None = None
        self._fallback_path = fallback
        self._fallback: RunLock | None = None
        self._client = client if client is not None else s3_client()
        self._record: dict[str, Any] = {}
        self._etag: str | None = None
        self._renewed = 0.0  # monotonic time of the last write that landed
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # -- the store -------------------------------------------------------------------------------
    def _call(self, method: str, **kwargs: Any) -> Any:
        """One request to the store; an unreachable store stops the run naming the endpoint only."""
        try:
            return getattr(self._client, method)(Bucket=self.bucket, Key=self.key, **kwargs)
        except Exception as exc:
            if storage._is_unreachable(exc):
                where = storage._endpoint_of(getattr(self._client.meta, "endpoint_url", None))
                raise storage.StorageUnavailableError(
                    f"s3 storage at {where} is unreachable ({type(exc).__name__}) after "
                    f"{storage.S3_RETRY['total_max_attempts']} attempts with backoff, taking or renewing the run "
                    f"lock: check that the endpoint is up, then run again"
                ) from None
            raise

    def _put(self, **condition: str) -> str | None:
        """Write this run's record under ``condition``; its new ETag, or None if the race was lost."""
        body = json.dumps(self._record).encode()
        try:
            answer = self._call("put_object", Body=body, ContentType="application/json", **condition)
        except Exception as exc:
            if _code(exc) in _LOST_RACE:
                return None
            raise
        self._renewed = time.monotonic()
        return answer["ETag"]

    def _read(self) -> tuple[dict[str, Any] | None, str, float] | None:
        """``(record, etag, seconds since its last write on the store's clock)``, None if absent."""
        try:
            answer = self._call("get_object")
        except Exception as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return None
            raise
        from email.utils import parsedate_to_datetime

        served = (answer.get("ResponseMetadata") or {}).get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(served) if served else None
        age = (now - answer["LastModified"]).total_seconds() if now is not None else 0.0
        return parse_record(answer["Body"].read()), answer["ETag"], age

    # -- the lock --------------------------------------------------------------------------------
    def holder(self) -> dict[str, Any] | None:
        found = self._read()
        return None if found is None else found[0]

    def _try_take(self) -> bool:
        self._record = holder_record(self.pipeline)
        etag = self._put(IfNoneMatch="*")
        if etag is None:
            found = self._read()
            if found is None:  # released in between: try again at once
                return self._try_take()
            record, seen, age = found
            if age <= float(self.config.stale_after_s):
                return False
            etag = self._put(IfMatch=seen)  # only one of the runs taking over wins
            if etag is None:
                return False
            self.left_behind = record or {}
            logger.warning("the lease of the run lock was not renewed for %.0f s (run.stale_after_s): taken over",
                           age)  # fmt: skip
        self._etag = etag
        return True

    def _honours_conditions(self) -> bool:
        """Whether the store refuses a second create of the lease it holds now (a store that
        ignores ``If-None-Match`` would let every run take it)."""
        if self._put(IfNoneMatch="*") is None:
            return True
        self._call("delete_object")
        return False

    def acquire(self) -> None:
        try:
            taken = self._try_take()
            if taken and self.left_behind is None and not self._honours_conditions():
                raise _Unsupported
        except Exception as exc:
            if not isinstance(exc, _Unsupported) and _code(exc) not in _UNSUPPORTED:
                raise
            logger.warning("this S3 store has no conditional writes: the run lock is a file on this machine, so it "
                           "orders this machine's runs only")  # fmt: skip
            self._etag = None
            self._fallback = RunLock(self._fallback_path, self.config, pipeline=self.pipeline)
            self._fallback.acquire()
            self.left_behind = self._fallback.left_behind
            return
        if not taken:
            self._wait()
        if self.left_behind is not None:
            logger.warning("recovered the run lock left by %s: that run stopped renewing its lease (killed?). What "
                           "it saved is whole (atomic saves); this run redoes what it left undone.",
                           describe(self.left_behind))  # fmt: skip
        self._renewer = threading.Thread(target=self._renew, name="mvl-run-lock-lease", daemon=True)
        self._renewer.start()
        logger.info("run lock (S3 lease) taken for pipeline %r", self.pipeline)

    def _wait(self) -> None:
        timeout = float(self.config.lock_timeout_s)
        if self.config.lock == "refuse":
            raise RunLockedError(refused(describe(self.holder())))
        logger.warning("another run writes this project's data: %s; waiting up to %.0f s for it to finish",
                       describe(self.holder()), timeout)  # fmt: skip
        started = reminded = time.monotonic()
        while not self._try_take():
            waited = time.monotonic() - started
            if waited >= timeout:
                raise RunLockedError(gave_up(timeout, describe(self.holder())))
            if time.monotonic() - reminded >= REMIND_EVERY_S:
                reminded = time.monotonic()
                logger.info("still waiting for %s (%.0f s so far)", describe(self.holder()), waited)
            time.sleep(min(POLL_S, self.config.heartbeat_s, max(0.0, timeout - waited)))
        logger.info("the other run finished: waited %.1f s", time.monotonic() - started)

    def _renew(self) -> None:
        while not self._stop.wait(float(self.config.heartbeat_s)):
            with self._mutex:
                if self._etag is None:
                    return
                try:
                    etag = self._put(IfMatch=self._etag)
                except Exception as exc:  # noqa: BLE001 - the lease decides, not one failed request
                    if time.monotonic() - self._renewed > float(self.config.stale_after_s):
                        self._lose(f"its lease could not be renewed for run.stale_after_s ({type(exc).__name__})")
                        return
                    logger.warning("the run lock's lease was not renewed (%s): trying again", type(exc).__name__)
                    continue
                if etag is None:
                    self._lose("another run took its lease over")
                    return
                self._etag = etag

    def _lose(self, why: str) -> None:
        self.lost, self._etag = why, None
        logger.error("this run lost the run lock: %s. Another run may write the data now; this run stops before "
                     "its next node.", why)  # fmt: skip

    def check(self) -> None:
        """Raise :class:`RunLockLostError` once the lease is lost (called before each node)."""
        if self.lost is not None:
            raise RunLockLostError(f"this run lost the run lock of its data root: {self.lost}; run it again")

    def note(self, **fields: str) -> None:
        """Add ``fields`` (ids, no PHI) to this run's record, in its next write of the lease."""
        if self._fallback is not None:
            self._fallback.note(**fields)
            return
        with self._mutex:
            if self._etag is None:
                return
            self._record.update(fields)
            etag = self._put(IfMatch=self._etag)
            if etag is None:
                self._lose("another run took its lease over")
            else:
                self._etag = etag

    def release(self) -> None:
        if self._fallback is not None:
            self._fallback.release()
            self._fallback = None
            return
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=float(storage.S3_TIMEOUTS["read_timeout"]) * 2)
        with self._mutex:
            etag, self._etag = self._etag, None
        if etag is None:
            return
        try:
            try:
                self._call("delete_object", IfMatch=etag)
            except Exception as exc:
                if _code(exc) not in _UNSUPPORTED:
                    raise
                self._call("delete_object")  # a store without conditional deletes: ours until now
        except Exception as exc:  # noqa: BLE001 - the lease lapses by itself
            logger.warning("the run lock's lease was not deleted (%s): it lapses after run.stale_after_s",
                           type(exc).__name__)  # fmt: skip
            return
        logger.info("run lock released")
