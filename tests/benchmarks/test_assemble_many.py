"""The benchmark harness benchmarks/_assemble_many.py (not pipeline code) assembles the same volumes
as the pipeline's assembler, in processes and in threads, and reports a bad series as its error."""

from __future__ import annotations

import numpy as np

from benchmarks._assemble_many import assemble_many
from mvl_pipeline.core.errors import ImagingError
from mvl_pipeline.core.volume import Volume, affine_from_geometry
from mvl_pipeline.dicom.assemble import assemble_series
from mvl_pipeline.dicom.write import dataset_bytes, series_uids, write_image_series


def small_series(n_slices: int, seed: str):
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1500, (12, 10, n_slices)).astype(np.float32)
    volume = Volume(array, affine_from_geometry((0.8, 0.9, 2.0), (5.0, -7.0, 11.0)))
    return write_image_series(volume, header={"PatientID": "P1"}, uids=series_uids("t", seed, n_slices=n_slices))


def test_assemble_many_in_two_processes_and_threads() -> None:
    from concurrent.futures import ThreadPoolExecutor

    good_a = [dataset_bytes(ds) for ds in small_series(4, seed="a")]
    good_b = [dataset_bytes(ds) for ds in small_series(5, seed="b")]
    broken = good_a[:1] + good_a[2:]  # a missing slice
    expected = [assemble_series(good_a), assemble_series(good_b)]
    results = assemble_many([good_a, good_b, broken], workers=2)
    for volume, reference in zip(results[:2], expected, strict=True):
        np.testing.assert_array_equal(volume.array, reference.array)
        np.testing.assert_allclose(volume.affine, reference.affine)
    assert isinstance(results[2], ImagingError) and results[2].reason == "missing_slices"
    with ThreadPoolExecutor(2) as pool:
        threaded = assemble_many([good_a, good_b], executor=pool, then=lambda v: v.shape)
    assert threaded == [reference.shape for reference in expected]
