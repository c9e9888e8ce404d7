"""A detached NRRD header (``scan.nhdr``) and the data file it names (``scan.raw``) are one
unit of ingest work: a changed data file re-ingests the case, and the data file is never taken
for a DICOM file of its own. Before, ``.raw`` files were ignored: a re-exported ``scan.raw`` kept
the old voxels in the case store."""

from __future__ import annotations

import os

import nrrd
import numpy as np
from ingest_support import KEY, run_ingest, write_drop

from mvl_pipeline.core import pseudonyms

HEADER = (
    b"NRRD0004\ntype: float\ndimension: 3\nsizes: 24 20 12\nspace: left-posterior-superior\n"
    b"space directions: (1.5,0,0) (0,1.5,0) (0,0,3)\nspace origin: (0,0,0)\nencoding: raw\n"
    b"endian: little\ndata file: scan.raw\n\n"
)


def _image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    array = rng.normal(100.0, 20.0, size=(24, 20, 12)).astype(np.float32)
    array[8:16, 6:14, 3:9] += 300.0
    return array


def test_a_changed_data_file_of_a_detached_header_re_ingests_its_case(tmp_path, count_processed):
    label = np.zeros((24, 20, 12), np.uint8)
    label[8:16, 6:14, 3:9] = 1
    label_path = tmp_path / "label.nrrd"
    nrrd.write(str(label_path), label, {"space": "left-posterior-superior", "space directions": np.diag([1.5, 1.5, 3.0]),
                                        "space origin": np.zeros(3)})  # fmt: skip
    first = _image(0)
    drop = write_drop(tmp_path / "drop", {
        "site/scan.nhdr": HEADER, "site/scan.raw": first.tobytes(order="F"), "site/scan_seg.nrrd": label_path.read_bytes(),
    })  # fmt: skip
    root = tmp_path / "data"
    run = run_ingest(drop, root)
    case_id = pseudonyms.case_pseudonym(KEY, "volume", "site/scan.nhdr")
    assert run.case_ids() == [case_id]
    assert run.quarantine == []  # the .raw is not a file of its own (never "not DICOM")
    np.testing.assert_allclose(run.case(case_id).image.array, first)
    assert count_processed() == ["site/scan.nhdr"]

    run_ingest(drop, root)  # nothing changed: nothing processed
    assert count_processed() == ["site/scan.nhdr"]

    second = _image(1)  # the site re-exports the voxels; the header stays byte for byte
    raw = drop / "site" / "scan.raw"
    raw.write_bytes(second.tobytes(order="F"))
    stat = raw.stat()
    os.utime(raw, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    again = run_ingest(drop, root)
    assert count_processed() == ["site/scan.nhdr", "site/scan.nhdr"]
    np.testing.assert_allclose(again.case(case_id).image.array, second)
