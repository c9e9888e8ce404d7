"""Segment a new study with the registered champion: ``python -m mvl_pipeline.commands.predict``.

    python -m mvl_pipeline.commands.predict STUDY OUTPUT_DIR [--model-uri models:/medvisionllama@champion]

``STUDY`` is a folder of DICOM files (one image series, or pick one with ``--series-index``) or a
NIfTI / NRRD file. The model is preprocessed, applied and mapped back exactly as in evaluation
(the plan travels with the registered model). Writes ``OUTPUT_DIR/prediction.nii.gz`` (labels on
the study's own grid) and, for DICOM input, ``OUTPUT_DIR/prediction_seg.dcm``: a DICOM SEG that
references the source series, for a clinical viewer. The SEG belongs to that patient's record
and so carries the source's patient/study attributes; nothing identifying is logged.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mvl_pipeline.core.case import Case
from mvl_pipeline.core.errors import ImagingError
from mvl_pipeline.core.volume import Volume, guess_modality
from mvl_pipeline.evaluation.scoring import EvaluateConfig, predict_case
from mvl_pipeline.formats.nifti import encode_nifti

logger = logging.getLogger("mvl_pipeline.commands.predict")

SEG_CATEGORIES = {"organ": "Organ", "lesion": "Morphologically Altered Structure"}


def load_registered(model_uri: str, tracking_uri: str | None) -> tuple[tuple[dict, dict], dict, str]:
    """``((state, config), plan, version)`` of a registered model, e.g. ``models:/name@champion``."""
    import mlflow

    from mvl_pipeline.formats.model_bundle import read_bundle

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="mvl-predict-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
        weights, plan = read_bundle(Path(local) / "artifacts" / "model_dir")
    return weights, plan, model_uri


def read_dicom_study(folder: Path, series_index: int | None) -> tuple[Volume, list[Any]]:
    """The study's image series as a Volume, plus its source data sets (for the SEG)."""
    from mvl_pipeline.dicom.assemble import assemble_series
    from mvl_pipeline.dicom.read import read_dataset, read_header, sort_study

    headers = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            headers[path] = read_header(path)
        except ImagingError:  # a stray non-DICOM file: not what we segment
            continue
    ordered = sorted(sort_study(headers).series.values(), key=len, reverse=True)
    if not ordered:
        raise ValueError("no DICOM image series found in the input folder")
    if series_index is None and len(ordered) > 1:
        logger.info("%d image series in the folder: using the largest (--series-index to choose)", len(ordered))
    chosen = ordered[series_index or 0]
    return assemble_series(chosen), [read_dataset(path) for path in chosen]


def read_volume_file(path: Path) -> Volume:
    from mvl_pipeline.formats.volumes import read_volume

    return read_volume(path.read_bytes(), str(path), read_sibling=lambda sibling: Path(sibling).read_bytes())


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mvl_pipeline.commands.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="DICOM folder, or a .nii/.nii.gz/.nrrd file")
    parser.add_argument("output", type=Path, help="output folder (created)")
    parser.add_argument("--model-uri", default="models:/medvisionllama@champion")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--llm-cache-dir", default="data/06_models/llm_cache")
    parser.add_argument("--modality", default=None, help="for NIfTI/NRRD input: CT or MR (default: guess)")
    parser.add_argument("--series-index", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)

    from mvl_pipeline.model import model_from_weights

    (state, config), plan, uri = load_registered(args.model_uri, args.tracking_uri)
    model = model_from_weights(state, config, llm_cache_dir=args.llm_cache_dir)
    datasets: list[Any] = []
    if args.study.is_dir():
        image, datasets = read_dicom_study(args.study, args.series_index)
        modality = str(datasets[0].get("Modality", "CT"))
    else:
        image = read_volume_file(args.study)
        modality = args.modality or guess_modality(image)
    logger.info("predicting a %s volume %s with %s", modality, "x".join(map(str, image.shape)), uri)
    case = Case("input", "input", Volume(image.array.astype(np.float32), image.affine, {"modality": modality}),
                meta={"modality": modality})  # fmt: skip
    labels = predict_case(model, case, plan, num_classes=model.cfg.num_classes, params=EvaluateConfig())
    prediction = Volume(labels.astype(np.uint8), image.affine, {"model_uri": uri, "plan_id": plan.get("plan_id")})
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "prediction.nii.gz").write_bytes(encode_nifti(prediction, compress=True))
    names = {int(k): str(v) for k, v in plan.get("label_names", {}).items()}
    logger.info("wrote prediction.nii.gz: %s", ", ".join(f"{names.get(int(v), v)} {int((labels == v).sum())} voxels"
                                                         for v in np.unique(labels) if v))  # fmt: skip
    if datasets:
        write_seg(prediction, datasets, names, args.output / "prediction_seg.dcm", uri)
    return 0


def write_seg(prediction: Volume, datasets: list[Any], names: dict[int, str], target: Path, uri: str) -> None:
    from mvl_pipeline.dicom.write import dataset_bytes, make_uid, write_segmentation

    values = sorted(names) or sorted(int(v) for v in np.unique(prediction.array) if v)
    segments = [(v, names.get(v, f"class {v}"), SEG_CATEGORIES.get(names.get(v, ""), "Tissue")) for v in values]
    series = str(datasets[0].SeriesInstanceUID)
    seg = write_segmentation(
        prediction,
        source_images=datasets,
        segments=segments,
        uids=(make_uid("seg-series", series, uri), make_uid("seg-sop", series, uri), 901),
        header_overrides={"SeriesDescription": "MedVisionLlama prediction (not for diagnosis)"},
    )
    target.write_bytes(dataset_bytes(seg))
    logger.info("wrote %s (DICOM SEG referencing the source series)", target.name)


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
