"""Real files through the ingest pipeline: pydicom's and pydicom-data's test files (CT and MR
slices, Enhanced MR, the real liver SEG, compressed pixel data, the known-broken files),
nibabel's test data (big-endian, NIfTI-2, truncated) and the pyradiomics volumes, converted to a
DICOM drop and to a Medical Segmentation Decathlon task folder.

Every broken file ends in quarantine (or is skipped, for non-images) with its exact reason,
while the good files of the same drop are ingested with exact pixels.
"""

from __future__ import annotations

import copy
import gzip
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from ingest_support import KEY, ingest_params, real_file, run_ingest, write_drop
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from mvl_pipeline.core import pseudonyms
from mvl_pipeline.core.volume import Volume, lps_to_ras
from mvl_pipeline.datasets.drop import encode_file
from mvl_pipeline.datasets.volume import VolumeDataset
from mvl_pipeline.dicom.write import SeriesUids, make_uid, write_image_series
from mvl_pipeline.synthetic.sample_drop import convert_volumes_to_drop

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
PROJECT_LESION = 2  # params:ingest labels: lesion (the pyradiomics masks, MSD "tumour")
PROJECT_ORGAN = 1  # params:ingest labels: organ (the liver SEG's "Liver")


def pydicom_file(name: str) -> bytes:
    """A pydicom / pydicom-data test file; missing means a broken environment: fail, never skip."""
    path = get_testdata_file(name)
    if path is None:
        pytest.fail(f"pydicom test file {name} not found: is pydicom-data installed?")
    return real_file(path)


def nibabel_file(name: str) -> bytes:
    return real_file(NIBABEL_DATA / name)


def _nifti_gz(array: np.ndarray, affine: np.ndarray) -> bytes:
    return gzip.compress(nib.Nifti1Image(array, affine).to_bytes())


# -- pyradiomics ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def pyradiomics(shared_data) -> dict[str, tuple[Volume, Volume]]:
    """brain1, breast1 and a 128x128x14 crop of lung1 around its lesion: (image, mask)."""
    cases = {}
    for name in ("brain1", "breast1", "lung1"):
        image = VolumeDataset(
            filepath=str(shared_data / "pyradiomics" / f"{name}_image.nrrd")
        ).load()
        label = VolumeDataset(
            filepath=str(shared_data / "pyradiomics" / f"{name}_label.nrrd")
        ).load()
        if name == "lung1":
            corner = np.array([160, 300, 26])
            crop = (slice(160, 288), slice(300, 428), slice(26, 40))
            affine = image.affine.copy()
            affine[:3, 3] = (image.affine @ np.r_[corner, 1])[:3]
            image, label = (
                Volume(image.array[crop].copy(), affine),
                Volume(label.array[crop].copy(), affine),
            )
        assert np.count_nonzero(label.array) > 0
        cases[name] = (image, label)
    return cases


@pytest.fixture(scope="session")
def pyradiomics_dicom(pyradiomics) -> dict[str, tuple[str, dict[str, bytes]]]:
    """The pyradiomics volumes as a hospital DICOM drop (real pixels, generated headers, SEG
    labels): ``{volume name: (case id, that study's files)}``."""
    files = {
        path: encode_file(ds) for path, ds in convert_volumes_to_drop(pyradiomics, seed=3).items()
    }
    studies: dict[str, tuple[str, dict[str, bytes]]] = {}
    for path, data in files.items():
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        if ds.Modality in ("CT", "MR"):
            shape = (int(ds.Columns), int(ds.Rows))
            name = next(n for n, (image, _) in pyradiomics.items() if image.shape[:2] == shape)
            folder = path.split("/")[0]  # one patient folder per converted volume
            study = {p: d for p, d in files.items() if p.split("/")[0] == folder}
            studies[name] = (
                pseudonyms.case_pseudonym(KEY, ds.StudyInstanceUID, ds.SeriesInstanceUID),
                study,
            )
    assert sorted(studies) == ["brain1", "breast1", "lung1"]
    assert sum(len(study) for _, study in studies.values()) == len(files)
    return studies


def _canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Array and affine reoriented to the closest RAS+ axes (flips and axis swaps only)."""
    image = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(array), affine))
    return np.asanyarray(image.dataobj), image.affine


def _assert_same_world(volume: Volume, array: np.ndarray, affine: np.ndarray) -> None:
    """The same value at every world position: DICOM stacks slices along the slice normal, so a
    source grid whose k axis points the other way comes back flipped, with a matching affine."""
    got, got_affine = _canonical(volume.array, volume.affine)
    want, want_affine = _canonical(array, affine)
    np.testing.assert_allclose(got_affine, want_affine, atol=1e-4)
    np.testing.assert_array_equal(got, want)


def _assert_pyradiomics_case(
    run, case_id: str, volumes: tuple[Volume, Volume], modality: str
) -> None:
    image, mask = volumes
    case = run.case(case_id)
    assert case.modality == modality
    _assert_same_world(case.image, image.array.astype(np.float32), image.affine)  # stored exactly
    _assert_same_world(
        case.label, np.where(mask.array != 0, PROJECT_LESION, 0).astype(np.uint8), image.affine
    )
    assert case.meta["present_labels"] == [PROJECT_LESION]


# -- broken files -------------------------------------------------------------------------------
#: drop path -> (pydicom test file, status, quarantine reasons, skip reasons, modality)
BROKEN = {
    "incoming/1/MR_truncated.dcm": ("MR_truncated.dcm", "quarantined", ["unreadable_file"], [], "unknown"),
    "incoming/2/no_meta.dcm": ("no_meta.dcm", "quarantined", ["not_dicom"], [], "unknown"),
    "incoming/3/meta_missing_tsyntax.dcm": ("meta_missing_tsyntax.dcm", "quarantined", ["unreadable_file"], [], "unknown"),
    "incoming/4/badVR.dcm": ("badVR.dcm", "skipped", [], ["not_an_image"], "RTDOSE"),
    "incoming/5/rtplan_truncated.dcm": ("rtplan_truncated.dcm", "quarantined", ["unreadable_file"], [], "unknown"),
    "incoming/6/rtplan.dcm": ("rtplan.dcm", "skipped", [], ["not_an_image"], "RTPLAN"),
    "incoming/7/zipMR.gz": ("zipMR.gz", "quarantined", ["not_dicom"], [], "unknown"),
    "incoming/8/liver.dcm": ("liver.dcm", "quarantined", ["label_without_image"], [], "SEG"),
    "incoming/9/CT_small.dcm": ("CT_small.dcm", "skipped", [], ["unlabelled_series"], "CT"),
    "incoming/10/rtstruct.dcm": ("rtstruct.dcm", "quarantined", ["label_without_image"], [], "RTSTRUCT"),
}  # fmt: skip


def test_known_broken_files_are_quarantined_and_good_studies_beside_them_ingested(
    tmp_path, pyradiomics, pyradiomics_dicom
):
    case_ids = {name: case_id for name, (case_id, _) in pyradiomics_dicom.items()}
    files = {path: pydicom_file(source) for path, (source, *_) in BROKEN.items()}
    for _, study in pyradiomics_dicom.values():
        files |= study
    run = run_ingest(write_drop(tmp_path / "drop", files), tmp_path / "data")

    outcome = {}
    for path in BROKEN:
        unit = run.unit_of(path)
        outcome[path] = (
            unit["status"],
            [q["reason"] for q in unit["quarantined"]],
            [s["reason"] for s in unit["skipped"]],
            unit["modality"],
        )
    assert outcome == {path: tuple(expected) for path, (_, *expected) in BROKEN.items()}
    # every file is its own unit (no study of a broken file swallowed a good one)
    manifest = run.manifest
    units = {manifest["files"][pseudonyms.file_key(KEY, p)]["unit"] for p in BROKEN}
    assert len(units) == len(BROKEN)
    skipped_details = {s["detail"] for p in BROKEN for s in run.unit_of(p)["skipped"]}
    assert "non-image object RT Plan Storage (RTPLAN)" in skipped_details
    assert "non-image object RT Dose Storage (RTDOSE)" in skipped_details

    # the good studies of the same drop: all ingested, pixels exact
    assert run.case_ids() == sorted(case_ids.values())
    for name, modality in (("brain1", "MR"), ("breast1", "MR"), ("lung1", "CT")):
        _assert_pyradiomics_case(run, case_ids[name], pyradiomics[name], modality)
    assert run.summary_counts() == {
        ("ingested", "ok"): 3,
        ("quarantined", "label_without_image"): 2,
        ("quarantined", "not_dicom"): 2,
        ("quarantined", "unreadable_file"): 3,
        ("skipped", "not_an_image"): 2,
        ("skipped", "unlabelled_series"): 1,
    }
    assert sorted(r["reason"] for r in run.quarantine) == sorted(
        reason for _, _, reasons, _, _ in BROKEN.values() for reason in reasons
    )


@pytest.mark.parametrize(
    ("name", "syntax"),
    [
        ("JPEG-lossy.dcm", "JPEG Extended (Process 2 and 4)"),
        ("JPEG2000-embedded-sequence-delimiter.dcm", "JPEG 2000 Image Compression"),
    ],
)
def test_file_no_plugin_can_decode_is_quarantined_as_no_decoder(
    tmp_path, pyradiomics, pyradiomics_dicom, name, syntax
):
    breast_id, breast = pyradiomics_dicom["breast1"]
    drop = write_drop(tmp_path / "drop", breast | {f"nm/{name}": pydicom_file(name)})
    run = run_ingest(drop, tmp_path / "data", ingest_params(keep_unlabelled=True))

    unit = run.unit_of(f"nm/{name}")
    assert unit["status"] == "quarantined"
    assert [(q["reason"], q["n_files"]) for q in unit["quarantined"]] == [("no_decoder", 1)]
    assert unit["quarantined"][0]["detail"].startswith(f"no decoder for transfer syntax {syntax} (")
    assert run.case_ids() == [breast_id]
    _assert_pyradiomics_case(run, breast_id, pyradiomics["breast1"], "MR")


def test_real_single_slices_and_stripped_enhanced_mr_get_exact_reasons(
    tmp_path, pyradiomics, pyradiomics_dicom
):
    """As an inference drop (unlabelled series kept): single slices are too few for a volume,
    and pydicom-data's emri_small (its functional groups stripped) has no plane geometry."""
    breast_id, breast = pyradiomics_dicom["breast1"]
    singles = {
        "CT_small.dcm": "CT",
        "MR_small.dcm": "MR",
        "693_UNCI.dcm": "CT",
        "emri_small.dcm": "MR",
    }
    drop = write_drop(tmp_path / "drop", breast | {f"pacs/{n}": pydicom_file(n) for n in singles})
    run = run_ingest(drop, tmp_path / "data", ingest_params(keep_unlabelled=True))

    for name, modality in singles.items():
        unit = run.unit_of(f"pacs/{name}")
        assert (unit["status"], unit["modality"]) == ("quarantined", modality)
        (record,) = unit["quarantined"]
        if name == "emri_small.dcm":
            assert record["reason"] == "inconsistent_geometry"
            assert record["detail"].startswith(
                "no plane geometry (ImageOrientationPatient, PixelSpacing"
            )
        else:
            assert (record["reason"], record["detail"]) == (
                "too_few_slices",
                "1 slice(s), at least 8 needed",
            )
    assert run.case_ids() == [breast_id]


# -- compressed, big-endian and multi-frame pixels ----------------------------------------------------
def _series_from_slice(
    ds: Dataset, seed: str, n_slices: int = 8, step_mm: float = 5.0
) -> dict[str, bytes]:
    """A hospital-style series from one real slice: same (compressed) pixel data, new positions."""
    series_uid = make_uid("series", seed)
    files = {}
    for k in range(n_slices):
        clone = copy.deepcopy(ds)
        clone.SeriesInstanceUID = series_uid
        clone.SOPInstanceUID = clone.file_meta.MediaStorageSOPInstanceUID = make_uid("sop", seed, k)
        clone.InstanceNumber = n_slices - k
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        clone.ImagePositionPatient = [x, y, z + k * step_mm]
        files[f"{seed}/{k}.dcm"] = encode_file(clone)
    return files


def _with_plane_geometry(ds: Dataset, series_seed: str) -> Dataset:
    """emri_small with the functional groups an Enhanced MR needs (pixels untouched)."""
    ds = copy.deepcopy(ds)
    ds.SeriesInstanceUID = make_uid("series", series_seed)
    shared = Dataset()
    orientation, measures = Dataset(), Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures.PixelSpacing, measures.SliceThickness = [0.9, 0.9], 3.0
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = [orientation], [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k in range(int(ds.NumberOfFrames)):
        position, frame = Dataset(), Dataset()
        position.ImagePositionPatient = [-28.8, -28.8, 3.0 * k]
        frame.PlanePositionSequence = [position]
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = frames
    return ds


def test_real_compressed_big_endian_and_multiframe_pixels_are_ingested_exactly(tmp_path):
    reference = pydicom.dcmread(
        io.BytesIO(pydicom_file("MR_small.dcm"))
    ).pixel_array  # uncompressed
    files = {}
    for name in ("MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"):
        ds = pydicom.dcmread(io.BytesIO(pydicom_file(name)))
        # The file's InstitutionName "TOSHIBA" is also the start of its Manufacturer
        # "TOSHIBA_MEC", which de-identification keeps: the PHI guard cannot tell the two apart
        # and quarantines the case (asserted below with the header as it is).
        assert (ds.InstitutionName, ds.Manufacturer) == ("TOSHIBA", "TOSHIBA_MEC")
        ds.InstitutionName = "Site A Imaging"
        files |= _series_from_slice(ds, name.removesuffix(".dcm"))
    as_is = pydicom.dcmread(io.BytesIO(pydicom_file("MR_small.dcm")))
    as_is.StudyInstanceUID = make_uid(
        "study", "MR_small_as_is"
    )  # its own study (identity is per study)
    files |= _series_from_slice(as_is, "MR_small_as_is")
    emri = {
        "emri_small.dcm": pydicom.dcmread(io.BytesIO(pydicom_file("emri_small.dcm"))),
        "emri_small_big_endian.dcm": pydicom.dcmread(
            io.BytesIO(pydicom_file("emri_small_big_endian.dcm"))
        ),
    }
    assert (
        emri["emri_small_big_endian.dcm"].file_meta.TransferSyntaxUID
        == pydicom.uid.ExplicitVRBigEndian
    )
    for name, ds in emri.items():
        files[f"enhanced/{name}"] = encode_file(_with_plane_geometry(ds, name))
    run = run_ingest(
        write_drop(tmp_path / "drop", files), tmp_path / "data", ingest_params(keep_unlabelled=True)
    )

    mr_small = pydicom.dcmread(io.BytesIO(pydicom_file("MR_small.dcm")), stop_before_pixels=True)
    as_is_case = pseudonyms.case_pseudonym(
        KEY, as_is.StudyInstanceUID, make_uid("series", "MR_small_as_is")
    )
    assert [(r["reason"], r["case_id"], r["detail"]) for r in run.quarantine] == [
        ("phi_guard", as_is_case, "identifying text survived de-identification")
    ]
    for name in ("MR_small_jp2klossless", "MR_small_RLE"):
        case = run.case(
            pseudonyms.case_pseudonym(KEY, mr_small.StudyInstanceUID, make_uid("series", name))
        )
        assert case.image.shape == (64, 64, 8) and case.label is None
        for k in range(8):  # lossless: every slice is the uncompressed original
            np.testing.assert_array_equal(case.image.array[:, :, k], reference.T.astype(np.float32))
        assert case.image.affine[2, 2] == pytest.approx(5.0)
    frames = emri["emri_small.dcm"].pixel_array  # (frames, rows, columns)
    for name, ds in emri.items():
        case = run.case(pseudonyms.case_pseudonym(KEY, ds.StudyInstanceUID, make_uid("series", name)))
        np.testing.assert_array_equal(
            case.image.array, frames.transpose(2, 1, 0).astype(np.float32)
        )
        np.testing.assert_allclose(np.diag(case.image.affine)[:3], [-0.9, -0.9, 3.0])  # LPS -> RAS
    assert len(run.case_ids()) == 4


# -- the real liver SEG ---------------------------------------------------------------------------
def test_real_liver_seg_is_placed_on_the_ct_series_it_references(tmp_path):
    """pydicom-data's liver.dcm (3 BINARY frames, 512x512) with a CT series rebuilt on the grid
    it references (real CT pixels from 693_UNCI.dcm, generated headers): the organ label lands
    on slices 2-4, voxel for voxel."""
    seg = pydicom.dcmread(io.BytesIO(pydicom_file("liver.dcm")))
    ct = pydicom.dcmread(io.BytesIO(pydicom_file("693_UNCI.dcm")))
    hu = ct.pixel_array.astype(np.float32) * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    spacing = [
        float(v)
        for v in seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    ]
    first_frame = [
        float(v)
        for v in seg.PerFrameFunctionalGroupsSequence[0]
        .PlanePositionSequence[0]
        .ImagePositionPatient
    ]
    affine_lps = np.diag([spacing[1], spacing[0], 1.0, 1.0])
    affine_lps[:3, 3] = [first_frame[0], first_frame[1], first_frame[2] - 2.0]  # 2 slices below
    image = Volume(np.repeat(hu.T[:, :, None], 8, axis=2), lps_to_ras(affine_lps))
    uids = SeriesUids(
        study=seg.StudyInstanceUID,
        series=seg.ReferencedSeriesSequence[0].SeriesInstanceUID,
        frame_of_reference=seg.FrameOfReferenceUID,
        sop_instances=tuple(make_uid("liver-ct", k) for k in range(8)),
        series_number=1,
    )
    header = {
        "Modality": "CT",
        "PatientID": str(seg.PatientID),
        "PatientName": str(seg.PatientName),
    }
    files = {
        f"liver/ct/{k}.dcm": encode_file(ds)
        for k, ds in enumerate(write_image_series(image, header=header, uids=uids))
    }
    files["liver/seg/liver.dcm"] = pydicom_file("liver.dcm")
    run = run_ingest(write_drop(tmp_path / "drop", files), tmp_path / "data")

    case_id = pseudonyms.case_pseudonym(KEY, seg.StudyInstanceUID, uids.series)
    assert run.case_ids() == [case_id]
    case = run.case(case_id)
    np.testing.assert_allclose(case.image.array, image.array, atol=0.5)
    expected = np.zeros(image.shape, dtype=np.uint8)
    for f, frame in enumerate(seg.pixel_array):  # frames at z = first, +1, +2 mm -> k = 2, 3, 4
        expected[:, :, 2 + f] = np.where(frame.T > 0, PROJECT_ORGAN, 0)
    np.testing.assert_array_equal(case.label.array, expected)
    assert (
        int(np.count_nonzero(case.label.array)) == int(np.count_nonzero(seg.pixel_array)) > 100_000
    )
    assert case.meta["present_labels"] == [PROJECT_ORGAN]


# -- nibabel's test data -------------------------------------------------------------------------
def test_nibabel_big_endian_nifti2_and_truncated_files(tmp_path, pyradiomics, pyradiomics_dicom):
    breast_id, breast = pyradiomics_dicom["breast1"]
    anatomical = nib.Nifti1Image.from_bytes(nibabel_file("anatomical.nii"))
    assert anatomical.header.endianness == ">"
    big_endian = np.asanyarray(anatomical.dataobj)
    mask = (big_endian > 12000).astype(np.uint8)
    nifti2 = nib.Nifti2Image.from_bytes(gzip.decompress(nibabel_file("example_nifti2.nii.gz")))
    first_volume = np.asanyarray(nifti2.dataobj)[..., 0]
    nifti2_3d = nib.Nifti2Image(first_volume, nifti2.affine)
    nifti2_mask = (first_volume > 400).astype(np.uint8)
    files = (
        breast
        | {
            "nib/anatomical.nii": nibabel_file("anatomical.nii"),
            "nib/anatomical_label.nii.gz": _nifti_gz(mask, anatomical.affine),
            "nib/example_nifti2.nii.gz": nibabel_file("example_nifti2.nii.gz"),  # 4-D
            "nib/example_nifti2_label.nii.gz": _nifti_gz(nifti2_mask, nifti2.affine),
            "nib/first_volume.nii": nifti2_3d.to_bytes(),
            "nib/first_volume_label.nii.gz": _nifti_gz(nifti2_mask, nifti2.affine),
            "nib/truncated.nii": nibabel_file("anatomical.nii")[:30_000],
            "nib/truncated_label.nii.gz": _nifti_gz(mask, anatomical.affine),
            "nib/phantom_truncated.PAR": nibabel_file("phantom_truncated.PAR"),
            "nib/phantom_truncated.REC": nibabel_file("phantom_truncated.REC"),
        }
    )
    run = run_ingest(write_drop(tmp_path / "drop", files), tmp_path / "data")

    def volume_case(path: str) -> str:
        return pseudonyms.case_pseudonym(KEY, "volume", path)

    assert run.case_ids() == sorted(
        [breast_id, volume_case("nib/anatomical.nii"), volume_case("nib/first_volume.nii")]
    )
    case = run.case(volume_case("nib/anatomical.nii"))
    np.testing.assert_array_equal(case.image.array, big_endian.astype(np.float32))
    np.testing.assert_allclose(case.image.affine, anatomical.affine)
    np.testing.assert_array_equal(case.label.array, mask)
    case = run.case(volume_case("nib/first_volume.nii"))
    np.testing.assert_array_equal(case.image.array, first_volume.astype(np.float32))
    np.testing.assert_allclose(case.image.affine, nifti2.affine, atol=1e-5)  # an oblique grid
    np.testing.assert_array_equal(case.label.array, nifti2_mask)

    four_d = run.unit_of("nib/example_nifti2.nii.gz")["quarantined"]
    assert [(q["reason"], q["detail"].split(":")[0]) for q in four_d] == [
        ("not_3d_volume", "not a 3-D volume (shape (32, 20, 12, 2))")
    ]
    truncated = run.unit_of("nib/truncated.nii")["quarantined"]
    assert [q["reason"] for q in truncated] == ["unreadable_file"]
    assert truncated[0]["detail"].startswith("not a readable NIfTI volume")
    for name in (
        "nib/phantom_truncated.PAR",
        "nib/phantom_truncated.REC",
    ):  # PAR/REC is not supported
        assert [q["reason"] for q in run.unit_of(name)["quarantined"]] == ["not_dicom"]
    _assert_pyradiomics_case(run, breast_id, pyradiomics["breast1"], "MR")


# -- a Medical Segmentation Decathlon task folder -----------------------------------------------------
def test_msd_task_folder_built_from_the_pyradiomics_volumes(tmp_path, pyradiomics):
    task = "Task99_Pyradiomics"
    files: dict[str, bytes] = {}
    for name in ("brain1", "breast1"):
        image, mask = pyradiomics[name]
        files[f"{task}/imagesTr/{name}.nii.gz"] = _nifti_gz(image.array, image.affine)
        files[f"{task}/labelsTr/{name}.nii.gz"] = _nifti_gz(
            mask.array.astype(np.uint8), image.affine
        )
    lung, _ = pyradiomics["lung1"]
    files[f"{task}/imagesTs/lung1.nii.gz"] = _nifti_gz(lung.array, lung.affine)
    descriptor = {
        "name": "pyradiomics",
        "modality": {"0": "MR"},
        "labels": {"0": "background", "1": "tumour"},
        "training": [
            {"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"}
            for n in ("brain1", "breast1", "ghost")
        ],
        "test": ["./imagesTs/lung1.nii.gz"],
    }
    files[f"{task}/dataset.json"] = json.dumps(descriptor).encode()
    run = run_ingest(write_drop(tmp_path / "drop", files), tmp_path / "data")

    ids = {
        n: pseudonyms.case_pseudonym(KEY, "volume", f"{task}/imagesTr/{n}.nii.gz")
        for n in ("brain1", "breast1")
    }
    assert run.case_ids() == sorted(ids.values())
    for name, case_id in ids.items():
        _assert_pyradiomics_case(run, case_id, pyradiomics[name], "MR")  # "tumour" -> lesion
        np.testing.assert_allclose(
            run.case(case_id).image.affine, pyradiomics[name][0].affine, atol=1e-4
        )
    test_unit = run.unit_of(f"{task}/imagesTs/lung1.nii.gz")
    assert (test_unit["status"], [s["reason"] for s in test_unit["skipped"]]) == (
        "skipped",
        ["unlabelled_image"],
    )
    assert [(r["reason"], r["source_kind"]) for r in run.quarantine] == [("missing_file", "file")]
    assert run.quarantine[0]["detail"] == "2 file(s) listed in dataset.json are missing"
