"""Segment new studies with the registered champion: ``python -m mvl_pipeline.predict``.

    python -m mvl_pipeline.predict INPUT OUTPUT_DIR [--model-uri models:/medvisionllama@champion]

``INPUT`` is one study or a folder of them:

- a NIfTI / NRRD file -> ``OUTPUT_DIR/prediction.nii.gz``;
- a folder of DICOM files of one study (any depth; the largest image series, or
  ``--series-index``) -> ``OUTPUT_DIR/prediction.nii.gz`` and ``prediction_seg.dcm``, a DICOM SEG
  that references the source series, for a clinical viewer;
- a folder of several studies: every NIfTI/NRRD file in it (an MSD ``imagesTs`` folder) becomes
  ``OUTPUT_DIR/<its name>.nii.gz``, every DICOM study in it (grouped by StudyInstanceUID)
  ``OUTPUT_DIR/study-<n>/prediction.nii.gz`` + ``prediction_seg.dcm``, and
  ``OUTPUT_DIR/predictions.csv`` lists input, output, status and, for a study that failed, the
  reason. One bad input never stops the others (exit status 1 when any failed).

A model trained on several input channels (``ingest.channels``) takes them from a DICOM study
by the same rules as ingest (one series per channel, resampled onto the first channel's grid;
the SEG references the first channel's series) or from a 4-D NIfTI (in an MSD task folder, each
volume by the name its ``dataset.json`` gives it, as the training volume was named; a lone 4-D
file by the indices the training images had them, and only with as many volumes as they had); a
study without one of the channels fails with ``missing_channel`` naming it.

The model is loaded once; each study is preprocessed, predicted and mapped back exactly as in
evaluation (the plan and post-processing travel with the registered model). Predictions go back
to the hospital and carry the study's identity (the SEG references its patient and study), and
``predictions.csv`` names each input as it was given; the log names studies by their number only
and never repeats a path (the input's folder and file names may name a patient).
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mvl_pipeline.core import storage
from mvl_pipeline.core.channels import plan_channels
from mvl_pipeline.core.errors import ImagingError, without_path
from mvl_pipeline.core.volume import Volume, guess_modality
from mvl_pipeline.formats.nifti import encode_nifti, geometry_disagreement_mm, header_geometry
from mvl_pipeline.formats.volumes import read_volume, volume_suffix

logger = logging.getLogger("mvl_pipeline.commands.predict")

SEG_CATEGORIES = {"organ": "Organ", "lesion": "Morphologically Altered Structure"}


@dataclass
class Study:
    """One input: a volume file, or the DICOM files of one study."""

    name: str  # output name (volume: the file's stem; DICOM: study-<n>)
    kind: str  # "volume" | "dicom"
    paths: list[Path] = field(default_factory=list)
    source: str = ""  # the input, relative to INPUT, for predictions.csv
    channel_names: tuple[str, ...] = ()  # an MSD task's modalities by volume index (its dataset.json)


def load_registered(model_uri: str, tracking_uri: str | None) -> tuple[tuple[dict, dict], dict, str]:
    """``((state, config), plan, uri)`` of a registered model, e.g. ``models:/name@champion``."""
    import mlflow

    from mvl_pipeline.datasets.model_registry import check_weights, registered_weights_tag
    from mvl_pipeline.formats.model_bundle import read_bundle

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    registered = registered_weights_tag(model_uri)
    with tempfile.TemporaryDirectory(prefix="mvl-predict-") as tmp:
        source = registered[2] if registered is not None else model_uri
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp)
        weights, plan = read_bundle(Path(local) / "artifacts" / "model_dir")
    if registered is not None:  # the weights the gate scored, not an artifact replaced since
        check_weights(weights[0], registered[1], registered[0])
    return weights, plan, model_uri


def _stem(path: Path) -> str:
    suffix = volume_suffix(path.name) or path.suffix
    return path.name[: len(path.name) - len(suffix)]


def discover(root: Path) -> tuple[list[Study], bool]:
    """The studies under ``root`` and whether it is a batch (several studies, or a folder of
    volume files)."""
    if root.is_file():
        if not volume_suffix(root.name):  # read_volume's ValueError showed as the bare word "ValueError"
            raise ValueError("the input file is not NIfTI/NRRD (.nii, .nii.gz, .nrrd, .nhdr); a DICOM study is given as its folder")
        return [Study(_stem(root), "volume", [root], root.name)], False
    if not root.is_dir():
        raise FileNotFoundError("the input is neither a file nor a folder (the path is not repeated: it may name a patient)")
    from mvl_pipeline.dicom.read import read_header

    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    volumes = [p for p in files if volume_suffix(p.name) and p.parent == root]
    channel_names: tuple[str, ...] = ()
    if (root / "dataset.json").is_file():  # an MSD task folder: its test images (imagesTs)
        from mvl_pipeline.formats.msd import read_task

        task = read_task((root / "dataset.json").read_bytes())
        volumes = [root / image for image in task.test if (root / image).is_file()]
        files = []
        channel_names = task.channel_names
    by_study: dict[str, list[Path]] = {}
    for path in files:
        if volume_suffix(path.name) or path.name.lower() == "dataset.json":
            continue
        try:
            header = read_header(path)
            study = str(header.get("StudyInstanceUID", ""))
        except ImagingError:
            continue  # not DICOM (a README, a report): nothing to segment
        except Exception:  # noqa: BLE001 - a value pydicom cannot decode when first read
            logger.warning("a file of the input is DICOM with a header that cannot be decoded: left out")
            continue
        by_study.setdefault(study, []).append(path)
    studies, seen = [], set()
    for path in volumes:  # x.nii.gz and x.nrrd in one folder: x and x-2, never one overwriting
        name, n = _stem(path), 1
        while name in seen:
            n += 1
            name = f"{_stem(path)}-{n}"
        seen.add(name)
        studies.append(Study(name, "volume", [path], str(path.relative_to(root)), channel_names))
    for index, paths in enumerate(by_study.values(), start=1):
        common = Path(*Path(*[p.relative_to(root) for p in paths][0].parts[:-1]).parts) if paths else Path()
        studies.append(Study(f"study-{index:03d}", "dicom", paths, str(common) or "."))
    if not studies:
        raise ValueError("no DICOM study and no NIfTI/NRRD file found in the input")
    return studies, bool(volumes) or len(by_study) > 1


def read_dicom_study(paths: list[Path], series_index: int | None) -> tuple[Volume, list[Any]]:
    """The study's image series as a Volume, plus its source data sets (for the SEG)."""
    from mvl_pipeline.dicom.assemble import assemble_series
    from mvl_pipeline.dicom.read import read_dataset, read_header, sort_study

    headers = {path: read_header(path) for path in paths}

    def rank(files: list[Path]) -> tuple[bool, int]:  # localizers last; then the most frames (a
        first = headers[files[0]]  # multi-frame series is one file holding them all)
        localizer = "LOCALIZER" in [str(v).upper() for v in (first.get("ImageType") or [])]
        return (not localizer, sum(int(headers[f].get("NumberOfFrames", 1) or 1) for f in files))

    ordered = sorted(sort_study(headers).series.values(), key=rank, reverse=True)
    if not ordered:
        raise ImagingError("no DICOM image series in the study")
    if series_index is None and len(ordered) > 1:
        logger.info("%d image series in the study: using the one with the most slices, localizers last "
                    "(--series-index to choose)", len(ordered))  # fmt: skip
    chosen = ordered[series_index or 0]
    return assemble_series(chosen), [read_dataset(path) for path in chosen]


def read_dicom_channels(paths: list[Path], channels: list[dict[str, Any]], min_overlap: float) -> tuple[Volume, list[Any]]:
    """A study's series picked by the model's channel rules (``plan["channels"]``, as at ingest),
    resampled onto the reference channel's grid; plus the reference series' data sets (the SEG
    references them). A study without a series for some channel: :class:`MissingChannelError`."""
    from mvl_pipeline.core.channels import rules_of
    from mvl_pipeline.dicom.assemble import assemble_series
    from mvl_pipeline.dicom.read import read_dataset, read_header, sort_study
    from mvl_pipeline.ingestion.channels import check_frames, series_for_channels
    from mvl_pipeline.preprocessing.channels import stack_channels

    headers = {path: read_header(path) for path in paths}
    series = {str(uid): files for uid, files in sort_study(headers).series.items()}
    rules = rules_of(channels)
    chosen = series_for_channels(rules, {uid: headers[files[0]] for uid, files in series.items()})
    check_frames(rules, [headers[series[uid][0]] for uid in chosen])
    volumes = [assemble_series(series[uid]) for uid in chosen]
    image, _ = stack_channels(volumes, [r.name for r in rules], min_overlap=min_overlap)
    return image, [read_dataset(path) for path in series[chosen[0]]]


def read_input(study: Study, channels: list[dict[str, Any]], plan: dict[str, Any], args: Any) -> tuple[Volume, list[Any], str]:
    """``(image, source data sets for the SEG, modality)`` of one study; with the model's input
    channels for a multi-channel model (a multi-series DICOM study, or a 4-D NIfTI)."""
    from mvl_pipeline.ingestion.channels import recorded_volume_channels

    if study.kind == "dicom" and channels:
        recorded = plan.get("channel_min_overlap")  # what ingest used (0 is a value: no overlap needed)
        min_overlap = 0.5 if recorded is None else float(recorded)
        image, datasets = read_dicom_channels(study.paths, channels, min_overlap)
        return image, datasets, str(channels[0]["modality"])
    if study.kind == "dicom":
        image, datasets = read_dicom_study(study.paths, args.series_index)
        return image, datasets, str(datasets[0].get("Modality", "") or "") or guess_modality(image)
    path = study.paths[0]
    image = read_volume(path.read_bytes(), str(path), read_sibling=lambda p: Path(p).read_bytes(), channels=bool(channels), name="<input>")
    if channels:
        return recorded_volume_channels(image, channels, study.channel_names), [], str(channels[0]["modality"])
    return image, [], input_modality(image, plan, args.modality)


def input_modality(image: Volume, plan: dict[str, Any], given: str | None) -> str:
    """A NIfTI/NRRD input's modality (it carries none): ``--modality``, else the one the model was
    trained on when it knows one only, else a guess from the intensities; a guess the model's
    modalities contradict is said, since it picks the intensity normalisation."""
    if given:
        return given.upper()
    known = sorted(plan.get("normalization", {}))
    guessed = guess_modality(image)
    if len(known) == 1 and guessed != known[0]:
        logger.warning("an input looks like %s by its intensities, but the model knows %s only: normalised as %s "
                       "(--modality chooses)", guessed, known[0], known[0])  # fmt: skip
        return known[0]
    if known and guessed not in known:
        logger.warning("an input looks like %s, a modality the model was not trained on (%s): the plan's default "
                       "normalisation is used (--modality chooses)", guessed, ", ".join(known))  # fmt: skip
    return guessed


def seg_bytes(prediction: Volume, datasets: list[Any], names: dict[int, str], uri: str) -> bytes:
    """The prediction as a DICOM SEG referencing the source series (``datasets``)."""
    from mvl_pipeline.dicom.segmentation import write_segmentation
    from mvl_pipeline.dicom.write import dataset_bytes, make_uid

    values = sorted(names) or sorted(int(v) for v in np.unique(prediction.array) if v)
    segments = [(v, names.get(v, f"class {v}"), SEG_CATEGORIES.get(names.get(v, ""), "Tissue")) for v in values]
    series = str(datasets[0].SeriesInstanceUID)
    seg = write_segmentation(
        prediction,
        source_images=datasets,
        segments=segments,
        uids=(make_uid("seg-series", series, uri), make_uid("seg-sop", series, uri), 901),
        header_overrides={"SeriesDescription": "MedVisionLlama prediction (not for diagnosis)"},
        algorithm=("MedVisionLlama", uri),  # a model's output, never to be read as a reader's labels
    )
    return dataset_bytes(seg)


def write_outputs(
    segmenter: Any, study: Study, image: Volume, datasets: list[Any], labels: np.ndarray, out: Path, *, batch: bool,
    uri: str,
) -> str:
    """Write one study's prediction (NIfTI, and a DICOM SEG for a DICOM study); returns the
    output path (relative to ``out``)."""
    plan = segmenter.plan
    prediction = Volume(labels.astype(np.uint8), image.affine, {"model_uri": uri, "plan_id": plan.get("plan_id")})
    folder = out / study.name if (batch and study.kind == "dicom") else out
    target = out / f"{study.name}.nii.gz" if (batch and study.kind == "volume") else folder / "prediction.nii.gz"
    # a NIfTI input's own sform / qform and codes: the prediction lies where the image does in every
    # viewer, also in one that reads the qform where the input's two disagree
    geometry = header_geometry(str(study.paths[0])) if study.kind == "volume" else None
    if geometry is not None and not np.allclose(np.asarray(geometry["sform" if geometry["sform_code"] else "qform"]), image.affine, atol=1e-3):
        geometry = None  # the image was read with another affine than the header's (never expected)
    apart = geometry_disagreement_mm(geometry, image.shape) if geometry is not None else 0.0
    if apart > 1e-3:
        logger.warning(
            "the input's sform and qform put its grid up to %.3g mm apart (the sform was used); the prediction keeps "
            "both as the input has them, so it lies where each viewer shows the image", apart,
        )  # fmt: skip
    # a study's outputs are made before any is written: one that fails (its SEG) leaves none behind
    nifti = encode_nifti(prediction, compress=True, geometry=geometry)
    seg = seg_bytes(prediction, datasets, dict(segmenter.classes), uri) if datasets else None
    # whole or not at all: a reader (a viewer, a PACS push) never sees a half-written file
    folder.mkdir(parents=True, exist_ok=True)
    storage.write_bytes_atomic(None, "file", str(target), nifti)
    if seg is not None:
        storage.write_bytes_atomic(None, "file", str(folder / "prediction_seg.dcm"), seg)
    return str(target.relative_to(out))


def predict_study(segmenter: Any, study: Study, out: Path, *, batch: bool, uri: str, args: Any) -> str:
    """Segment one study and write its outputs; returns the output path (relative to ``out``)."""
    image, datasets, modality = read_input(study, plan_channels(segmenter.plan), segmenter.plan, args)
    labels = segmenter.segment(image, modality)
    return write_outputs(segmenter, study, image, datasets, labels, out, batch=batch, uri=uri)


def predict_studies(
    segmenter: Any, studies: list[Study], out: Path, *, batch: bool, uri: str, args: Any
) -> Iterator[tuple[Study, str | None, Exception | None]]:
    """``(study, output path or None, error or None)`` for every study, in order. Studies are
    read and segmented ``segmenter.config.case_batch`` at a time, so those that fit in one window
    share a forward pass (``Segmenter.segment_many``); at most that many are held in memory. A
    study that cannot be read, segmented or written fails alone: when a group's shared pass
    fails, each of its studies is segmented on its own, so the error lands on the study that
    caused it and the others are still written."""
    plan = segmenter.plan
    channels = plan_channels(plan)
    size = max(1, int(segmenter.config.case_batch))
    for start in range(0, len(studies), size):
        group = list(enumerate(studies[start : start + size], start=start))
        read: dict[int, tuple[Volume, list[Any], str]] = {}
        failed: dict[int, Exception] = {}
        for index, study in group:
            try:
                read[index] = read_input(study, channels, plan, args)
            except Exception as exc:  # one bad study never stops the others
                failed[index] = exc
        try:
            labels = dict(segmenter.segment_many((i, image, modality) for i, (image, _, modality) in read.items()))
        except Exception:
            labels = {}
            for index, (image, _, modality) in read.items():
                try:
                    labels[index] = segmenter.segment(image, modality)
                except Exception as exc:
                    failed[index] = exc
        for index, study in group:
            if index in failed:
                yield study, None, failed.pop(index)
                continue
            image, datasets, _ = read.pop(index)
            try:
                yield study, write_outputs(segmenter, study, image, datasets, labels.pop(index), out, batch=batch, uri=uri), None
            except Exception as exc:
                yield study, None, exc


def _store_problem(tracking_uri: str) -> str | None:
    """Why a local sqlite tracking store cannot be the one meant: MLflow would create an empty
    one where there is none (predict run outside the project folder)."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        return (f"no MLflow store at {tracking_uri} (relative to {Path.cwd()}): run predict in the project folder, "
                "or give --tracking-uri; a project has one after its first training run (`make train`)")  # fmt: skip
    return None


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mvl_pipeline.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path, help="a NIfTI/NRRD file, a DICOM study folder, or a folder of studies")
    parser.add_argument("output", type=Path, help="output folder (created)")
    parser.add_argument("--model-uri", default="models:/medvisionllama@champion", help="registered model (default: %(default)s; --env msd: models:/medvisionllama-msd@champion)")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow store (default: %(default)s, in the project folder)")
    parser.add_argument("--llm-cache-dir", default="data/06_models/llm_cache", help="converted LLM layer cache (default: %(default)s)")
    parser.add_argument("--modality", default=None, help="for NIfTI/NRRD input: CT or MR (default: the model's one modality, else a guess)")
    parser.add_argument("--series-index", type=int, default=None, help="DICOM: which image series, 0 = the most slices (default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)

    from mvl_pipeline.serving.segmenter import Segmenter
    try:
        studies, batch = discover(args.input)
    except (OSError, ValueError) as exc:
        logger.error("%s", without_path(exc))
        return 2
    if args.output.exists() and not args.output.is_dir():
        logger.error("the output must be a folder: a file is in its place (the path is not repeated: it may name a patient)")
        return 2
    problem = _store_problem(args.tracking_uri)
    if problem is not None:
        logger.error("%s", problem)
        return 2
    from mlflow.exceptions import MlflowException
    try:
        weights, plan, uri = load_registered(args.model_uri, args.tracking_uri)
    except MlflowException as exc:  # a model or alias the registry does not hold: one line, no traceback
        logger.error("cannot load %s from %s: %s (a model trained with --env msd is medvisionllama-msd)",
                     args.model_uri, args.tracking_uri, exc.message)  # fmt: skip
        return 2
    segmenter = Segmenter(weights, plan, llm_cache_dir=args.llm_cache_dir)
    logger.info("%d stud%s to segment with %s", len(studies), "y" if len(studies) == 1 else "ies", uri)
    try:
        args.output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        logger.error("the output folder cannot be made: %s", without_path(exc))
        return 2
    rows, failed = [], 0
    results = predict_studies(segmenter, studies, args.output, batch=batch, uri=uri, args=args)
    progress = tqdm(results, total=len(studies), desc="predict", unit="study", disable=len(studies) < 2)
    for index, (study, output, exc) in enumerate(progress, start=1):
        if exc is None:
            rows.append({"input": study.source, "output": output, "status": "ok", "reason": ""})
        else:  # one bad study never stops the others
            failed += 1
            reason = exc.reason if isinstance(exc, ImagingError) else type(exc).__name__
            logger.error("study %d of %d could not be segmented: %s", index, len(studies), reason)
            rows.append({"input": study.source, "output": "", "status": "failed", "reason": reason})
            if not batch and isinstance(exc, ImagingError):  # its detail, never its path ([...])
                logger.error("%s", exc.detail)
    if batch:
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=["input", "output", "status", "reason"])
        writer.writeheader()
        writer.writerows(rows)
        storage.write_bytes_atomic(None, "file", str(args.output / "predictions.csv"), table.getvalue().encode("utf-8"))
    logger.info("%d of %d studies segmented into the output folder", len(studies) - failed, len(studies))
    return 1 if failed else 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
