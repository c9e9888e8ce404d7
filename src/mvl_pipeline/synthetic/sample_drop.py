"""Build a sample hospital drop: DICOM CT series (or multi-series MR studies) with DICOM SEG
labels and fake PHI.

Two sources, one layout (a PACS export, folders named by UIDs, never by names)::

    <patient-folder-uid>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   one per slice
    <patient-folder-uid>/<StudyInstanceUID>/<SEG SeriesInstanceUID>/<SOPInstanceUID>.dcm

- :func:`generate_sample_drop` (what the ``sample_data`` pipeline writes): synthetic CT phantoms
  (:mod:`mvl_pipeline.synthetic.phantom`), SEG segment 1 = liver (organ), 2 = lesion. With
  ``mr_contrasts`` (e.g. ``[t1, t2]``) every study is instead an MR study of one series per
  contrast of the same phantom (:mod:`mvl_pipeline.synthetic.mr_study`), all in one Frame of
  Reference, the SEG on the first contrast's series.
- :func:`convert_volumes_to_drop`: real volumes (e.g. the pyradiomics NRRD cases) with generated
  headers; SEG segment 1 = lesion.

Everything is a pure function of its inputs: the same seed gives byte-identical files.
"""

from __future__ import annotations

import datetime as dt
import logging
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from mvl_pipeline.core.config import ConfigBlock
from mvl_pipeline.core.volume import Volume, guess_modality
from mvl_pipeline.dicom.segmentation import write_segmentation
from mvl_pipeline.dicom.write import (
    SeriesUids,
    make_uid,
    series_uids,
    write_image_series,
)
from mvl_pipeline.synthetic import phantom
from mvl_pipeline.synthetic.fake_headers import (
    fake_patient,
    fake_study_datetime,
    study_header,
)
from mvl_pipeline.synthetic.mr_study import MR_RESCALE, check_contrasts, contrast_grids, simulate_mr

logger = logging.getLogger(__name__)

CT_RESCALE = (1.0, -1024.0)
SEG_SERIES_NUMBER = 100
PHANTOM_SEGMENTS = (
    (phantom.LABEL_ORGAN, "Liver", "Organ"),
    (phantom.LABEL_LESION, "Lesion", "Morphologically Abnormal Structure"),
)
LESION_SEGMENTS = ((1, "Lesion", "Morphologically Abnormal Structure"),)


@dataclass(frozen=True)
class SampleDataConfig(ConfigBlock):
    """``params:sample_data`` (conf/base/parameters_sample_data.yml)."""

    WHERE = "sample_data"

    seed: int = 20261128
    n_patients: int = 24
    followup_fraction: float = 0.125  # share of patients with a second (follow-up) study
    image_size: int = 128  # rows = columns
    pixel_spacing_mm: tuple[float, float] = (2.9, 3.1)  # uniform range
    n_slices: tuple[int, int] = (40, 64)  # inclusive range
    slice_spacing_mm: float = 5.0
    thin_slice_spacings_mm: tuple[float, ...] = (2.5, 3.0)
    thin_slice_studies: int = 3
    non_axial_studies: int = 1
    non_axial_orientation: str = "coronal"  # coronal | sagittal | oblique
    oblique_tilt_deg: tuple[float, float] = (15.0, 8.0)
    noise_sigma_hu: tuple[float, float] = (10.0, 20.0)
    max_lesions: int = 3
    mr_contrasts: tuple[str, ...] = ()  # e.g. (t1, t2): MR studies, one series per contrast; (): CT
    contrast_slice_ratio: float = 1.5  # slice spacing of the 2nd and later contrasts / the first's

    def __post_init__(self) -> None:
        check_contrasts(self.mr_contrasts)
        if self.contrast_slice_ratio < 1.0:
            raise ValueError("contrast_slice_ratio must be >= 1")
        if self.n_patients < 1:
            raise ValueError("n_patients must be >= 1")
        if not 0.0 <= self.followup_fraction <= 1.0:
            raise ValueError("followup_fraction must be in [0, 1]")
        if self.n_slices[0] < 2 or self.n_slices[0] > self.n_slices[1]:
            raise ValueError("n_slices must be a range [low, high] with low >= 2")
        if self.non_axial_orientation not in ("coronal", "sagittal", "oblique"):
            raise ValueError("non_axial_orientation must be coronal, sagittal or oblique")

    @property
    def n_followups(self) -> int:
        return int(round(self.n_patients * self.followup_fraction))

    @property
    def n_studies(self) -> int:
        return self.n_patients + self.n_followups


@dataclass(frozen=True)
class StudyPlan:
    """Acquisition of one study (no PHI): which patient, which visit, which grid."""

    patient: int
    visit: int  # 0 baseline, 1 follow-up
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    orientation: str


@dataclass(frozen=True)
class SampleStudy:
    """One generated study: the truth (volumes) and what goes into its DICOM files."""

    plan: StudyPlan
    image: Volume  # float32 HU
    label: Volume  # uint8: 0 background, 1 organ, 2 lesion
    header: Mapping[str, Any]  # fake PHI + descriptions, as written into every slice
    patient_folder: str  # a UID: the patient's folder name in the drop
    uids: SeriesUids
    seg_uids: tuple[str, str, int]  # (series UID, SOP instance UID, series number)
    #: an MR study's further contrasts: (series description, image on its own grid, its UIDs)
    contrasts: tuple[tuple[str, Volume, SeriesUids], ...] = ()


def plan_studies(params: SampleDataConfig, rng: np.random.Generator) -> list[StudyPlan]:
    """Who is scanned how: follow-ups, thin-slice and non-axial studies drawn with ``rng``."""
    followups = set(rng.choice(params.n_patients, size=params.n_followups, replace=False).tolist())
    visits = [(p, v) for p in range(params.n_patients) for v in ((0, 1) if p in followups else (0,))]
    special = rng.permutation(len(visits))
    non_axial = set(special[: params.non_axial_studies].tolist())
    thin = set(
        special[params.non_axial_studies : params.non_axial_studies + params.thin_slice_studies].tolist()
    )
    plans = []
    for index, (patient, visit) in enumerate(visits):
        pixel = float(np.round(rng.uniform(*params.pixel_spacing_mm), 3))
        slice_spacing = (
            float(rng.choice(params.thin_slice_spacings_mm))
            if index in thin
            else float(params.slice_spacing_mm)
        )
        n_slices = int(rng.integers(params.n_slices[0], params.n_slices[1] + 1))
        plans.append(
            StudyPlan(
                patient=patient,
                visit=visit,
                shape=(params.image_size, params.image_size, n_slices),
                spacing=(pixel, pixel, slice_spacing),
                orientation=params.non_axial_orientation if index in non_axial else "axial",
            )
        )
    return plans


def iter_sample_studies(params: SampleDataConfig) -> Iterator[SampleStudy]:
    """Generate the studies one at a time (patient by patient, visits in order)."""
    root = np.random.SeedSequence(params.seed)
    plan_seed, *patient_seeds = root.spawn(1 + params.n_patients)
    plans = plan_studies(params, np.random.default_rng(plan_seed))
    drop = f"sample-drop-{params.seed}"
    patients: dict[int, tuple[Any, Any, Any, Any]] = {}
    last_visit: dict[int, dt.datetime] = {}
    for plan in plans:
        if plan.patient not in patients:
            anatomy_seed, phi_seed, *visit_seeds = patient_seeds[plan.patient].spawn(4)
            anatomy = phantom.sample_anatomy(
                np.random.default_rng(anatomy_seed),
                max_lesions=params.max_lesions,
                noise_sigma_hu=params.noise_sigma_hu,
            )
            phi_rng = np.random.default_rng(phi_seed)
            patients[plan.patient] = (anatomy, phi_rng, fake_patient(phi_rng), visit_seeds)
        anatomy, phi_rng, person, visit_seeds = patients[plan.patient]
        when = fake_study_datetime(phi_rng, after=last_visit.get(plan.patient))
        last_visit[plan.patient] = when
        rng = np.random.default_rng(visit_seeds[plan.visit])
        if plan.visit > 0:
            anatomy = phantom.follow_up(anatomy, rng)
        affine = phantom.acquisition_affine(
            shape=plan.shape,
            spacing=plan.spacing,
            orientation=plan.orientation,  # type: ignore[arg-type]
            centre=anatomy.scan_centre,
            tilt_deg=params.oblique_tilt_deg,
        )
        case = f"p{plan.patient}-v{plan.visit}"
        contrasts: tuple[tuple[str, Volume, SeriesUids], ...] = ()
        if params.mr_contrasts:
            (image, label), contrasts = _mr_series(anatomy, plan, params, rng, drop, case)
            header = study_header(
                person, when, phi_rng, modality="MR", study_description="MR ABDOMEN",
                series_description=_mr_description(params.mr_contrasts[0], plan.orientation),
            )  # fmt: skip
            uids = series_uids(drop, case, f"MR-{params.mr_contrasts[0]}", n_slices=plan.shape[2], series_number=2)
        else:
            image, label = phantom.simulate_ct(anatomy, affine, plan.shape, rng)
            header = study_header(
                person,
                when,
                phi_rng,
                series_description=f"ABDOMEN {plan.orientation.upper()} {plan.spacing[2]:.1f}mm",
            )
            uids = series_uids(drop, case, "CT", n_slices=plan.shape[2], series_number=2)
        seg_uids = (
            make_uid("series", drop, case, "SEG"),
            make_uid("sop", drop, case, "SEG"),
            SEG_SERIES_NUMBER,
        )
        yield SampleStudy(
            plan=plan,
            image=image,
            label=label,
            header=header,
            patient_folder=make_uid("patient-folder", drop, plan.patient),
            uids=uids,
            seg_uids=seg_uids,
            contrasts=contrasts,
        )


def _mr_description(contrast: str, orientation: str) -> str:
    return f"{contrast.upper()} {orientation.upper()}"


def _mr_series(
    anatomy: Any, plan: StudyPlan, params: SampleDataConfig, rng: np.random.Generator, drop: str, case: str
) -> tuple[tuple[Volume, Volume], tuple[tuple[str, Volume, SeriesUids], ...]]:
    """The first contrast (image, label) on the study's grid, and the further contrasts, each on
    its own grid (thicker slices over the same extent), with its own series UIDs."""
    grids = contrast_grids(plan.shape, plan.spacing, len(params.mr_contrasts), params.contrast_slice_ratio)
    volumes = []
    for contrast, (shape, spacing) in zip(params.mr_contrasts, grids, strict=True):
        affine = phantom.acquisition_affine(
            shape=shape, spacing=spacing, orientation=plan.orientation,  # type: ignore[arg-type]
            centre=anatomy.scan_centre, tilt_deg=params.oblique_tilt_deg,
        )  # fmt: skip
        volumes.append(simulate_mr(anatomy, affine, shape, rng, contrast))
    further = tuple(
        (_mr_description(contrast, plan.orientation), image,
         series_uids(drop, case, f"MR-{contrast}", n_slices=image.shape[2], series_number=3 + index))
        for index, (contrast, (image, _)) in enumerate(zip(params.mr_contrasts[1:], volumes[1:], strict=True))
    )  # fmt: skip
    return volumes[0], further


def study_files(
    study: SampleStudy,
    *,
    segments: Sequence[tuple[int, str, str]] = PHANTOM_SEGMENTS,
    rescale: tuple[float, float] = CT_RESCALE,
) -> dict[str, Dataset]:
    """The DICOM files of one study: relative path -> data set (image slices, then the SEG)."""
    if study.contrasts:
        rescale = MR_RESCALE
    slices = write_image_series(study.image, header=study.header, uids=study.uids, rescale=rescale)
    others = [
        ds
        for description, image, uids in study.contrasts
        for ds in write_image_series(image, header={**study.header, "SeriesDescription": description},
                                     uids=uids, rescale=rescale)
    ]  # fmt: skip
    seg = write_segmentation(
        study.label,
        source_images=slices,
        segments=segments,
        uids=study.seg_uids,
        header_overrides={"SeriesDescription": "Reference segmentation"},
    )
    study_folder = f"{study.patient_folder}/{study.uids.study}"
    files = {f"{study_folder}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm": ds for ds in slices + others}
    files[f"{study_folder}/{seg.SeriesInstanceUID}/{seg.SOPInstanceUID}.dcm"] = seg
    return files


def generate_sample_drop(config: SampleDataConfig) -> dict[str, Dataset]:
    """The synthetic sample drop, relative path -> DICOM data set (see module doc)."""
    logger.info(
        "generating the sample drop: %d patients, %d studies, seed %d",
        config.n_patients,
        config.n_studies,
        config.seed,
    )
    files: dict[str, Dataset] = {}
    for index, study in enumerate(iter_sample_studies(config), start=1):
        files.update(study_files(study))
        logger.info(
            "study %d/%d: %s, grid %s, spacing %s mm, %d organ / %d lesion voxels",
            index,
            config.n_studies,
            study.plan.orientation,
            "x".join(map(str, study.plan.shape)),
            "x".join(f"{s:g}" for s in study.plan.spacing),
            int(np.count_nonzero(study.label.array == phantom.LABEL_ORGAN)),
            int(np.count_nonzero(study.label.array == phantom.LABEL_LESION)),
        )
    logger.info("sample drop ready: %d files", len(files))
    return files


# ------------------------------------------------------------------- real volumes -> drop


def exact_rescale(array: np.ndarray, dtype: Any = np.int16) -> tuple[float, float]:
    """(slope, intercept) storing ``array`` in ``dtype``: (1, 0) when its values are integers
    that fit (exact); otherwise a linear map of [min, max] onto the integer range (lossy)."""
    info = np.iinfo(dtype)
    values = np.asarray(array)
    low, high = float(values.min()), float(values.max())
    if np.all(np.mod(values, 1) == 0) and low >= info.min and high <= info.max:
        return 1.0, 0.0
    slope = (high - low) / float(info.max - info.min) or 1.0
    return slope, low - info.min * slope


def convert_volumes_to_drop(
    cases: Mapping[str, tuple[Volume, Volume]],
    *,
    seed: int = 0,
    modalities: Mapping[str, str] | None = None,
) -> dict[str, Dataset]:
    """Real image + lesion-label volumes -> drop files with generated headers and fake PHI.

    ``cases`` maps a case name (used only to derive UIDs, never written) to ``(image, label)`` on
    the same grid; label value 1 = lesion becomes SEG segment 1. Modality per case from
    ``modalities`` or :func:`guess_modality`. Integer images are stored exactly (slope 1,
    intercept 0).
    """
    files: dict[str, Dataset] = {}
    drop = f"volume-drop-{seed}"
    for index, name in enumerate(sorted(cases), start=1):
        image, label = cases[name]
        modality = (modalities or {}).get(name) or guess_modality(image)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
        header = study_header(
            fake_patient(rng),
            fake_study_datetime(rng),
            rng,
            modality=modality,
            series_description=f"{modality} imported volume",
            study_description=f"{modality} STUDY",
        )
        lesion = Volume(
            (np.asarray(label.array) != 0).astype(np.uint8), label.affine, dict(label.meta)
        )
        study = SampleStudy(
            plan=StudyPlan(
                patient=index, visit=0, shape=image.shape, spacing=image.spacing, orientation="volume"
            ),
            image=image,
            label=lesion,
            header=header,
            patient_folder=make_uid("patient-folder", drop, name),
            uids=series_uids(drop, name, modality, n_slices=image.shape[2], series_number=2),
            seg_uids=(
                make_uid("series", drop, name, "SEG"),
                make_uid("sop", drop, name, "SEG"),
                SEG_SERIES_NUMBER,
            ),
        )
        files.update(
            study_files(study, segments=LESION_SEGMENTS, rescale=exact_rescale(image.array))
        )
        logger.info(
            "volume %d/%d: %s %s, %d lesion voxels",
            index,
            len(cases),
            modality,
            "x".join(map(str, image.shape)),
            int(np.count_nonzero(lesion.array)),
        )
    return files
