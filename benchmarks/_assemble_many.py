"""Benchmark harness: assemble several DICOM series in worker processes (shared-memory results).

Not part of the pipeline: ingest parallelises across studies (``mvl_pipeline.ingestion.run``).
``bench_ingest.py`` uses this to measure what a second core gives on series assembly alone.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from mvl_pipeline.core.errors import ImagingError
from mvl_pipeline.core.volume import Volume
from mvl_pipeline.dicom.assemble import _assemble_frames, assemble_series
from mvl_pipeline.dicom.decode import _read_frames
from mvl_pipeline.dicom.read import Source


def _shared_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _assemble_in_worker(
    sources: Sequence[Source], kwargs: Mapping[str, Any], then: Callable[[Volume], Any] | None
) -> Any:
    """Worker: assemble one series; return ``then(volume)``, or the volume via shared memory.

    An ImagingError is returned (not raised) so that one bad series does not hide the others.
    """
    holder: dict[str, str] = {}

    def allocate(shape: tuple[int, ...]) -> np.ndarray:
        handle = tempfile.NamedTemporaryFile(dir=_shared_dir(), prefix="mvl-series-", delete=False)
        handle.close()
        holder["path"] = handle.name
        return np.lib.format.open_memmap(handle.name, mode="w+", dtype=np.float32, shape=shape)

    try:
        files = [_read_frames(source) for source in sources]
        volume = _assemble_frames(files, out=None if then is not None else allocate, **kwargs)
    except ImagingError as error:
        if "path" in holder:
            os.unlink(holder["path"])
        return error
    if then is not None:
        return then(volume)
    return _SharedVolume(holder["path"], volume.affine, dict(volume.meta))


@dataclass(frozen=True)
class _SharedVolume:
    path: str
    affine: np.ndarray
    meta: dict[str, Any]

    def attach(self) -> Volume:
        try:
            block = np.load(self.path, mmap_mode="r+")
        finally:
            os.unlink(self.path)  # the mapping keeps the memory until the array is dropped
        return Volume(block.transpose(2, 1, 0), self.affine, self.meta)


def assemble_many(
    series: Sequence[Sequence[Source]],
    *,
    workers: int = 1,
    executor: Executor | None = None,
    then: Callable[[Volume], Any] | None = None,
    min_slices: int = 3,
    spacing_tolerance: float = 0.01,
) -> list[Any]:
    """Assemble several series; each result is a Volume (or ``then(volume)``) or the
    :class:`ImagingError` that series raised.

    Parallel: ``workers > 1`` starts a process pool for this call; ``executor`` uses yours
    (keep one for a whole ingest: worker start-up costs about a second). In worker processes,
    ``then`` (a picklable module-level function, e.g. "write the volume, return its path")
    runs next to the assembly and only its result travels back; without ``then`` the volume
    is assembled into shared memory (``/dev/shm``) and mapped by the caller. A
    ``ThreadPoolExecutor`` also works (pixel copies release the GIL; nothing is transferred).
    """
    kwargs = {"min_slices": min_slices, "spacing_tolerance": spacing_tolerance}

    def in_process(sources: Sequence[Source]) -> Any:
        try:
            volume = assemble_series(sources, **kwargs)
        except ImagingError as error:
            return error
        return then(volume) if then is not None else volume

    if executor is None and workers <= 1:
        return [in_process(sources) for sources in series]
    if isinstance(executor, ThreadPoolExecutor):
        return list(executor.map(in_process, series))
    own = executor is None
    pool = process_pool(workers) if own else executor
    try:
        futures = [
            pool.submit(_assemble_in_worker, list(sources), kwargs, then) for sources in series
        ]
        results = [future.result() for future in futures]
    finally:
        if own:
            pool.shutdown()
    return [r.attach() if isinstance(r, _SharedVolume) else r for r in results]


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool for :func:`assemble_many` (forkserver start: safe with threads around)."""
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))
