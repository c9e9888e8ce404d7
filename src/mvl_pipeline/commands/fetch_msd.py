"""Fetch one Medical Segmentation Decathlon task folder: download (resumable), verify, unpack.

    python -m mvl_pipeline.commands.fetch_msd Task04_Hippocampus [--dest data/01_raw/msd] \
        [--url URL] [--md5 HEX|none] [--retries 5] [--block-size BYTES]

The tar comes from ``--url`` (any fsspec URL: ``https://``, ``s3://`` with the standard AWS
variables, ``AWS_ENDPOINT_URL`` included, ``file://``, a path), by default MONAI's (:data:`TASKS`).
It is downloaded to ``<dest>/.<Task>.tar.part`` from the bytes already there (a range request per
block, transient errors retried), MD5-checked, unpacked safely into a hidden sibling folder, checked
to be an MSD task and renamed to ``<dest>/<Task>``: the task folder is there complete or not at all.
Exit codes: 0 ok (also when the task folder is already complete), 1 failure, 2 usage.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import logging
import re
import shutil
import tarfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import fsspec
from tqdm import tqdm

from mvl_pipeline.formats.msd import MsdDescriptorError, read_task

logger = logging.getLogger(__name__)

_MONAI_BUCKET = "https://msd-for-monai.s3-us-west-2.amazonaws.com"
#: task -> MD5 of its tar, copied from MONAI: ``monai.apps.DecathlonDataset.md5`` (and ``.resource``
#: for the URLs, ``<bucket>/<task>.tar``) in monai/apps/datasets.py, the tars MONAI downloads.
_MONAI_MD5 = {
    "Task01_BrainTumour": "240a19d752f0d9e9101544901065d872",
    "Task02_Heart": "06ee59366e1e5124267b774dbd654057",
    "Task03_Liver": "a90ec6c4aa7f6a3d087205e23d4e6397",
    "Task04_Hippocampus": "9d24dba78a72977dbd1d2e110310f31b",
    "Task05_Prostate": "35138f08b1efaef89d7424d2bcc928db",
    "Task06_Lung": "8afd997733c7fc0432f71255ba4e52dc",
    "Task07_Pancreas": "4f7080cfca169fa8066d17ce6eb061e4",
    "Task08_HepaticVessel": "641d79e80ec66453921d997fbf12a29c",
    "Task09_Spleen": "410d4a301da4e5b2f6f86ec3ddba524e",
    "Task10_Colon": "bad7a188931dc2f6acf72b08eb6202d0",
}
#: task -> (tar URL, MD5): the defaults of ``--url`` and ``--md5``.
TASKS: dict[str, tuple[str, str]] = {
    task: (f"{_MONAI_BUCKET}/{task}.tar", md5) for task, md5 in _MONAI_MD5.items()
}
DEFAULT_BLOCK_SIZE = 8 * 2**20
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MD5 = re.compile(r"^[0-9a-fA-F]{32}$")
_URL_USERINFO = re.compile(r"(?<=://)[^/\s@]+@")
_URL_QUERY = re.compile(r"(://[^\s?'\"]*)\?[^\s'\"]*")


class FetchError(RuntimeError):
    """The task could not be fetched; the message is the one line the user sees."""


def safe_url(text: str) -> str:
    """``text`` with every URL's user, password and query (a presigned signature) left out."""
    return _URL_QUERY.sub(r"\1?...", _URL_USERINFO.sub("", text))


def _transient(exc: BaseException | None) -> BaseException | None:
    """The reset, timeout, dropped connection or 5xx/429 in ``exc``'s cause chain, if any."""
    for _ in range(16):  # bounded: a chain can loop
        if exc is None or isinstance(exc, (ConnectionError, TimeoutError)):
            return exc
        status = getattr(exc, "status", None)
        if isinstance(status, int) and (status >= 500 or status == 429):
            return exc
        name = type(exc).__name__
        if any(word in name for word in ("Connection", "Connector", "Timeout", "Disconnected", "Payload")):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _describe(exc: BaseException) -> str:
    text = safe_url(" ".join(str(exc).split()))[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _storage_options(url: str) -> dict:
    if url.startswith(("http://", "https://")):
        import aiohttp  # fsspec's HTTP client: a stalled read becomes a (retried) timeout

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(sock_connect=30, sock_read=60)}}
    return {}


def _copy_block_by_block(fs, path: str, part: Path, total: int | None, block_size: int) -> None:
    start = part.stat().st_size if part.exists() else 0
    if start and total is None:
        logger.warning("the source does not report its size: cannot resume, starting over")
        start = 0
    try:
        _copy(fs, path, part, start, total, block_size, stream=False)
    except ValueError as exc:
        # fsspec's HTTP file reads block by block with Range requests; a server without them
        # (`python -m http.server`, some proxies) failed every download after its first block
        if "support range requests" not in str(exc) or not path.startswith(("http://", "https://")):
            raise
        logger.warning("the server does not answer range requests: downloading the whole file again in one "
                       "stream (an interrupted download of it cannot resume)")  # fmt: skip
        _copy(fs, path, part, 0, total, block_size, stream=True)


def _copy(fs, path: str, part: Path, start: int, total: int | None, block_size: int, *, stream: bool) -> None:
    opened = fs.open(path, "rb", block_size=0) if stream else fs.open(path, "rb", block_size=block_size, cache_type="none")
    with opened as src:
        if start:
            src.seek(start)  # a range request (http, s3) or a seek (local) per block from here
        with (
            open(part, "ab" if start else "wb", buffering=0) as out,
            tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                 desc=part.name, disable=None) as bar,
        ):  # fmt: skip
            while chunk := src.read(block_size):
                out.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size != total:
        raise ConnectionError(f"the source ended at {part.stat().st_size} of {total} bytes")


def download(
    url: str, part: Path, *, retries: int = 5, block_size: int = DEFAULT_BLOCK_SIZE,
    backoff: float = 1.0,
) -> None:  # fmt: skip
    """Complete ``part`` as a copy of ``url``, continuing from the bytes it already holds.

    Transient errors are retried (the count restarts whenever bytes arrived) with exponential
    backoff; after ``retries`` in a row, or on any other error, :class:`FetchError` naming the
    URL without credentials. ``part`` is kept, so a later run resumes.
    """
    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            fs, path = fsspec.core.url_to_fs(url, **_storage_options(url))
            total = fs.info(path).get("size")
            if total is not None and before > total:
                logger.warning("%s is larger than the source: starting over", part.name)
                part.unlink()
            if total is None or before != total:
                _copy_block_by_block(fs, path, part, total, block_size)
            return
        except Exception as exc:
            if (cause := _transient(exc)) is None:
                raise FetchError(f"cannot download {safe_url(url)}: {_describe(exc)}") from exc
            grew = part.exists() and part.stat().st_size > before
            failures = 1 if grew else failures + 1
            if failures > retries:
                why = f"{safe_url(url)} failed after {retries} retries: {_describe(cause)}"
                raise FetchError(f"download of {why}") from exc
            delay = min(backoff * 2 ** (failures - 1), 60.0)
            logger.warning("transient error reading %s (%s); retry %d/%d in %.1f s", safe_url(url),
                           _describe(cause), failures, retries, delay)  # fmt: skip
            time.sleep(delay)


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def check_task(folder: Path) -> int:
    """The MSD task in ``folder``'s number of training cases; :class:`FetchError` unless its
    ``dataset.json`` lists ``training`` cases and the folders and files it names are there."""
    try:
        task = read_task((folder / "dataset.json").read_bytes())
    except (OSError, MsdDescriptorError) as exc:
        raise FetchError(f"no readable dataset.json in {folder.name}: {exc}") from exc
    if not task.training:
        raise FetchError(f"{folder.name}/dataset.json lists no `training` cases")
    names = [p for pair in task.training for p in pair if p] + list(task.test)
    listed = [PurePosixPath(p) for p in names]
    where = f"{folder.name}/dataset.json"
    outside = [str(p) for p in listed if p.is_absolute() or ".." in p.parts]
    if outside:
        raise FetchError(f"{where} names paths outside the task: {outside[0]}")
    folders = sorted({str(p.parent) for p in listed if not (folder / p.parent).is_dir()})
    if folders:
        raise FetchError(f"{where} names folders that are not there: {folders}")
    missing = [str(p) for p in listed if not (folder / p).is_file()]
    if missing:
        raise FetchError(f"{where} lists {len(missing)} missing file(s), e.g. {missing[0]}")
    return len(task.training)


def _task_root(folder: Path) -> Path:
    if (folder / "dataset.json").is_file():
        return folder
    roots = [p for p in folder.iterdir() if p.is_dir() and (p / "dataset.json").is_file()]
    if len(roots) != 1:
        raise FetchError("the archive has no dataset.json (at its top or in one top folder)")
    return roots[0]


def unpack(archive: Path, target: Path) -> int:
    """Extract ``archive`` into a hidden sibling of ``target``, check it, rename it to ``target``.

    Members with absolute paths, ``..`` or links that leave the folder are refused (tarfile's
    ``data`` filter). On any failure the sibling is removed and ``target`` never appears.
    """
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(tmp, filter="data")
        except tarfile.TarError as exc:
            raise FetchError(f"refusing {archive.name}: {exc}") from exc
        root = _task_root(tmp)
        cases = check_task(root)
        root.rename(target)
        return cases
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch(
    task: str, *, dest: Path, url: str, md5: str | None, retries: int = 5,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Path:  # fmt: skip
    """``dest/task``, a complete MSD task folder, downloaded from ``url`` unless already there."""
    target = dest / task
    if target.exists():
        try:
            cases = check_task(target)
        except FetchError as exc:
            raise FetchError(f"{target} exists but is not a complete task ({exc})") from exc
        logger.info("%s is already complete (%d training cases): nothing to do", target, cases)
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / f".{task}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise FetchError(f"another fetch of {task} into {dest} is running") from exc
        for stale in dest.glob(f".{task}.tmp-*"):  # left by a run that was killed mid-unpack
            shutil.rmtree(stale, ignore_errors=True)
        part = dest / f".{task}.tar.part"
        done = part.stat().st_size if part.exists() else 0
        logger.info("downloading %s to %s (from byte %d)", safe_url(url), part, done)
        download(url, part, retries=retries, block_size=block_size)
        if md5 is None:
            logger.warning("--md5 none: %s is NOT verified", part.name)
        else:
            actual = md5_of(part)
            if actual != md5.lower():
                part.unlink()
                raise FetchError(f"MD5 mismatch for {safe_url(url)}: expected {md5.lower()}, "
                                 f"got {actual} (deleted {part.name})")  # fmt: skip
            logger.info("MD5 %s verified", actual)
        try:
            cases = unpack(part, target)
        except FetchError as exc:
            if md5 is not None:
                raise
            # nothing says these bytes are the archive (a truncated transfer?): kept, every later run
            # would refuse them again without downloading
            part.unlink(missing_ok=True)
            raise FetchError(f"{exc} (not verified: --md5 none; deleted {part.name}, the next run downloads it "
                             "again)") from exc  # fmt: skip
        part.unlink()
    logger.info("%s ready: %d training cases", target, cases)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mvl_pipeline.commands.fetch_msd", description=__doc__.split("\n\n")[0])
    parser.add_argument("task", help=f"MSD task (known: {', '.join(TASKS)})")
    parser.add_argument("--dest", type=Path, default=Path("data/01_raw/msd"),
                        help="folder that receives <task>/ (default: data/01_raw/msd)")  # fmt: skip
    parser.add_argument("--url", help="the task's tar (any fsspec URL; default: MONAI's copy)")
    parser.add_argument("--md5", help="expected MD5 of the tar, or 'none' to skip the check")
    parser.add_argument("--retries", type=int, default=5, help="retries on transient errors (default: 5)")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                        help="bytes per request (default: 8 MiB)")  # fmt: skip
    try:
        args = parser.parse_args(argv)
        if not _TASK_NAME.match(args.task):
            parser.error(f"invalid task name {args.task!r}")
        if args.task not in TASKS and args.url is None:
            parser.error(f"unknown task {args.task!r} without --url; known: {', '.join(TASKS)}")
        url, md5 = TASKS.get(args.task, (None, None))
        url, md5 = args.url or url, args.md5 or md5
        if md5 is None:
            parser.error(f"--md5 (or --md5 none) is required for {args.task!r}, not in the table")
        if md5.lower() != "none" and not _MD5.match(md5):
            parser.error(f"--md5 expects 32 hex digits or 'none', got {md5!r}")
        if args.retries < 0 or args.block_size <= 0:
            parser.error("--retries must be >= 0 and --block-size > 0")
    except SystemExit as exc:  # argparse: 2 on a usage error, 0 for --help
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    md5 = None if md5.lower() == "none" else md5
    try:
        fetch(args.task, dest=args.dest, url=url, md5=md5, retries=args.retries,
              block_size=args.block_size)  # fmt: skip
    except (FetchError, OSError) as exc:
        logger.error("fetch_msd: %s", exc)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; what was downloaded stays
        logger.error("fetch_msd: interrupted; run the same command again to go on from the bytes downloaded so far")
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
