"""A 4-D NIfTI MSD-layout task for tests: the real Hippocampus volumes (../shared, read only) as
channel 0 (``T1``) and a second contrast of the same anatomy as channel 1 (``T2``), with the
original labels and a ``dataset.json`` whose ``modality`` lists both. A missing source task is a
test failure (never a skip)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

TASK = "Task90_HippocampusT1T2"


def second_contrast(t1: np.ndarray) -> np.ndarray:
    """Another contrast of the same anatomy: bright where T1 is mid-grey, dark elsewhere."""
    t1 = t1.astype(np.float32)
    middle = np.percentile(t1, 60)
    return (1000.0 * np.exp(-(((t1 - middle) / (t1.std() + 1e-6)) ** 2))).astype(np.float32)


def build_task(
    source: Path, target: Path, names: Sequence[str], *, missing: Sequence[str] = (), empty: Sequence[str] = ()
) -> Path:
    """``target/TASK`` with 4-D images (T1, T2) of ``names`` and their labels; the images of
    ``missing`` hold T1 only (3-D), those of ``empty`` a constant T2."""
    if not (source / "dataset.json").is_file():
        pytest.fail(f"the MSD Hippocampus task is missing at {source}: tests need ../shared/data")
    task = target / TASK
    for kind in ("imagesTr", "labelsTr"):
        (task / kind).mkdir(parents=True, exist_ok=True)
    for name in names:
        image = nib.load(source / "imagesTr" / f"{name}.nii.gz")
        t1 = np.asarray(image.dataobj, dtype=np.float32)
        t2 = np.full_like(t1, 7.0) if name in empty else second_contrast(t1)
        array = t1 if name in missing else np.stack([t1, t2], axis=-1)
        nib.save(nib.Nifti1Image(array, image.affine), task / "imagesTr" / f"{name}.nii.gz")
        label = nib.load(source / "labelsTr" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(np.asarray(label.dataobj, dtype=np.uint8), label.affine),
                 task / "labelsTr" / f"{name}.nii.gz")  # fmt: skip
    descriptor = json.loads((source / "dataset.json").read_text())
    descriptor.update(
        name="HippocampusT1T2", modality={"0": "T1", "1": "T2"}, numTraining=len(names), numTest=0, test=[],
        training=[{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in names],
    )  # fmt: skip
    (task / "dataset.json").write_text(json.dumps(descriptor, indent=1))
    return task
