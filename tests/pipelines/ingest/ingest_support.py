"""Helpers of the ingest tests: small sample studies as drop files, and ``run_ingest``, which
runs the real ``ingest`` pipeline (conf/base/catalog_ingest.yml) with Kedro's SequentialRunner.

A module with its own name (not ``conftest``): with several conftest.py files and no
``__init__.py``, ``from conftest import ...`` could resolve to another folder's conftest.
Every output lands under the test's ``tmp_path``; the real data folders are only read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from mvl_pipeline.core import pseudonyms
from mvl_pipeline.core.case import Case
from mvl_pipeline.core.volume import Volume
from mvl_pipeline.datasets.case_store import CaseStoreDataset
from mvl_pipeline.datasets.drop import DropFolderDataset, encode_file
from mvl_pipeline.pipelines.ingest import create_pipeline
from mvl_pipeline.synthetic.sample_drop import (
    SampleDataConfig,
    iter_sample_studies,
    study_files,
)

PROJECT = Path(__file__).resolve().parents[3]
CATALOG_YML = PROJECT / "conf" / "base" / "catalog_ingest.yml"
PARAMS_YML = PROJECT / "conf" / "base" / "parameters_ingest.yml"

#: A random-looking 256-bit test key (the SecretKeyDataset takes hex from credentials.yml).
KEY_HEX = hashlib.sha256(b"mvl_pipeline ingest tests").hexdigest()
KEY = bytes.fromhex(KEY_HEX)

#: Five one-study patients of 64x64x12 CT phantoms; study 1 is acquired oblique.
SAMPLE_PARAMS = {
    "seed": 4711,
    "n_patients": 5,
    "followup_fraction": 0.0,
    "image_size": 64,
    "pixel_spacing_mm": [5.5, 6.0],
    "n_slices": [12, 12],
    "slice_spacing_mm": 8.0,
    "thin_slice_studies": 0,
    "non_axial_studies": 1,
    "non_axial_orientation": "oblique",
    "max_lesions": 2,
}


def ingest_params(**overrides: Any) -> dict[str, Any]:
    """``params:ingest`` from conf/base, one process (spawned pools are slow to start), no bar."""
    params = yaml.safe_load(PARAMS_YML.read_text())["ingest"]
    params.update({"workers": 1, "progress": False})
    params.update(overrides)
    return params


# -- sample studies ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleStudyFiles:
    """One generated study as drop files (Part 10 bytes) plus its ground truth."""

    study_uid: str
    series_uid: str
    seg_series_uid: str
    sop_uids: tuple[str, ...]  # image slices, in slice order k
    files: dict[str, bytes]  # relpath -> bytes
    image: Volume  # truth, float32 HU
    label: Volume  # truth, uint8 (1 organ, 2 lesion)
    orientation: str

    def slice_relpath(self, k: int) -> str:
        return next(p for p in self.files if p.endswith(f"/{self.sop_uids[k]}.dcm"))

    @property
    def case_id(self) -> str:
        return pseudonyms.case_pseudonym(KEY, self.study_uid, self.series_uid)


def build_sample_studies(params: Mapping[str, Any]) -> list[SampleStudyFiles]:
    studies = []
    for study in iter_sample_studies(SampleDataConfig.from_params(params)):
        datasets = study_files(study)
        studies.append(
            SampleStudyFiles(
                study_uid=study.uids.study,
                series_uid=study.uids.series,
                seg_series_uid=study.seg_uids[0],
                sop_uids=study.uids.sop_instances,
                files={path: encode_file(ds) for path, ds in datasets.items()},
                image=study.image,
                label=study.label,
                orientation=study.plan.orientation,
            )
        )
    return studies


def drop_files(*studies: SampleStudyFiles) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for study in studies:
        files.update(study.files)
    return files


def write_drop(folder: Path, files: Mapping[str, Any]) -> Path:
    """Write ``{relpath: bytes | pydicom.Dataset}`` into a drop folder (as the hospital would)."""
    DropFolderDataset(filepath=str(folder)).save(dict(files))
    return folder


def real_file(path: str | Path) -> bytes:
    """Bytes of a real test file; a missing one fails the test loudly (never a skip)."""
    path = Path(path)
    if not path.is_file():
        pytest.fail(f"real test file missing: {path} (is pydicom-data / nibabel installed?)")
    return path.read_bytes()


# -- running the pipeline ---------------------------------------------------------------------------
@dataclass
class IngestRun:
    """The outputs one ``ingest`` run left under ``root`` (the run's ``data_root``)."""

    root: Path

    @property
    def cases_path(self) -> Path:
        return self.root / "02_intermediate" / "cases"

    @property
    def manifest_path(self) -> Path:
        return self.root / "02_intermediate" / "ingest_manifest.json"

    @property
    def quarantine_path(self) -> Path:
        return self.root / "02_intermediate" / "quarantine.json"

    @property
    def summary_path(self) -> Path:
        return self.root / "08_reporting" / "ingest_summary.csv"

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text())

    @property
    def quarantine(self) -> list[dict[str, Any]]:
        return json.loads(self.quarantine_path.read_text())

    @property
    def summary(self) -> pd.DataFrame:
        return pd.read_csv(self.summary_path, keep_default_na=False)

    def case_ids(self) -> list[str]:
        return CaseStoreDataset(path=str(self.cases_path)).case_ids()

    def case(self, case_id: str) -> Case:
        return CaseStoreDataset(path=str(self.cases_path)).load_case(case_id)

    def unit_of(self, relpath: str) -> dict[str, Any]:
        """The manifest entry of the unit that the drop file ``relpath`` belongs to."""
        manifest = self.manifest
        ukey = manifest["files"][pseudonyms.file_key(KEY, relpath)]["unit"]
        return manifest["units"][ukey]

    def summary_counts(self) -> dict[tuple[str, str], int]:
        """(status, reason) -> count, summed over modalities."""
        counts: dict[tuple[str, str], int] = {}
        for row in self.summary.itertuples(index=False):
            counts[(row.status, row.reason)] = counts.get((row.status, row.reason), 0) + int(
                row.count
            )
        return counts


def ingest_catalog(
    drop_url: str,
    root: Path,
    params: Mapping[str, Any],
    *,
    key_hex: str | None = KEY_HEX,
    drop_credentials: Mapping[str, Any] | None = None,
    allow_empty: bool = False,
) -> DataCatalog:
    """The project's real ingest catalog (conf/base/catalog_ingest.yml) with globals filled in."""
    text = CATALOG_YML.read_text()
    text = text.replace("${globals:data_root}", str(root)).replace("${globals:drop_url}", drop_url)
    config = yaml.safe_load(text)
    # The key dataset reads conf/local/credentials.yml in a project; here a file of the test's own.
    key_file = root.parent / f"{root.name}-credentials.yml"
    key_file.write_text(yaml.safe_dump({} if key_hex is None else {"pseudonymisation": {"key": key_hex}}))
    config["pseudonymisation_key"].update(filepath=str(key_file), env_var=None)
    credentials: dict[str, Any] = {}
    if drop_credentials is not None:
        config["hospital_drop"]["credentials"] = "hospital_drop"
        credentials["hospital_drop"] = dict(drop_credentials)
    if allow_empty:
        config["hospital_drop"]["load_args"] = {"allow_empty": True}
    catalog = DataCatalog.from_config(config, credentials=credentials)
    catalog["params:ingest"] = MemoryDataset(dict(params))
    return catalog


def run_ingest(
    drop_url: str | Path, root: Path, params: Mapping[str, Any] | None = None, **kwargs: Any
) -> IngestRun:
    """``kedro run --pipeline ingest`` in miniature: the real pipeline, catalog and runner."""
    catalog = ingest_catalog(
        str(drop_url), root, ingest_params() if params is None else params, **kwargs
    )
    SequentialRunner().run(create_pipeline(), catalog)
    return IngestRun(root)


# -- comparing outputs ----------------------------------------------------------------------------
def snapshot(root: Path, *, under: Iterable[str] = ("",)) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``root`` (or under the given sub-folders)."""
    result = {}
    for sub in under:
        base = root / sub
        for path in sorted(base.rglob("*")):
            if path.is_file():
                result[str(path.relative_to(root))] = path.read_bytes()
    return result


def assert_same_cases(a: IngestRun, b: IngestRun) -> None:
    """Same case ids, patients, arrays, affines, labels and metadata in two runs' outputs."""
    assert a.case_ids() == b.case_ids()
    for case_id in a.case_ids():
        left, right = a.case(case_id), b.case(case_id)
        assert left.patient_id == right.patient_id
        np.testing.assert_array_equal(left.image.array, right.image.array)
        np.testing.assert_array_equal(left.image.affine, right.image.affine)
        assert (left.label is None) == (right.label is None)
        if left.label is not None:
            np.testing.assert_array_equal(left.label.array, right.label.array)
        assert dict(left.meta) == dict(right.meta)
