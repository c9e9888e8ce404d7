"""Turn real NRRD/NIfTI volumes with lesion masks into a hospital-style DICOM drop.

    python -m mvl_pipeline.commands.sample_drop --src ../shared/data/pyradiomics --dst DIR \
        [--cases breast1 lung1] [--seed 0] [--modality breast1=MR]

For every case ``<case>_image.<ext>`` and ``<case>_label.<ext>`` (``ext`` one of nrrd, nhdr,
nii.gz, nii) are read from ``--src`` with :class:`~mvl_pipeline.datasets.volume.VolumeDataset`
and written into ``--dst`` (local or ``s3://``) with
:class:`~mvl_pipeline.datasets.drop.DropFolderDataset`: real pixels, generated headers and fake
PHI, the label as a DICOM SEG (segment 1 = lesion). The source files are only read.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from mvl_pipeline.core.volume import Volume
from mvl_pipeline.datasets.drop import DropFolderDataset
from mvl_pipeline.datasets.volume import VolumeDataset
from mvl_pipeline.formats.volumes import VOLUME_SUFFIXES
from mvl_pipeline.synthetic.sample_drop import convert_volumes_to_drop

logger = logging.getLogger(__name__)

_EXTENSIONS = tuple(s.lstrip(".") for s in VOLUME_SUFFIXES)


def find_cases(src: Path) -> dict[str, tuple[Path, Path]]:
    """``{case: (image path, label path)}`` for every ``<case>_image.*`` with a matching label."""
    cases = {}
    for ext in _EXTENSIONS:
        for image in sorted(src.glob(f"*_image.{ext}")):
            case = image.name[: -len(f"_image.{ext}")]
            label = src / f"{case}_label.{ext}"
            if label.is_file() and case not in cases:
                cases[case] = (image, label)
    return cases


def load_cases(
    src: Path, names: Sequence[str] | None = None
) -> dict[str, tuple[Volume, Volume]]:
    available = find_cases(src)
    if not available:
        raise FileNotFoundError(f"no <case>_image/<case>_label volume pairs in {src}")
    chosen = list(names) if names else sorted(available)
    missing = [name for name in chosen if name not in available]
    if missing:
        raise FileNotFoundError(f"cases {missing} not found in {src} (have {sorted(available)})")
    return {
        name: (
            VolumeDataset(filepath=str(available[name][0])).load(),
            VolumeDataset(filepath=str(available[name][1])).load(),
        )
        for name in chosen
    }


def _parse_modalities(items: Sequence[str]) -> dict[str, str]:
    modalities = {}
    for item in items:
        case, sep, modality = item.partition("=")
        if not sep or modality.upper() not in ("CT", "MR"):
            raise argparse.ArgumentTypeError(f"--modality expects CASE=CT or CASE=MR, got {item!r}")
        modalities[case] = modality.upper()
    return modalities


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mvl_pipeline.commands.sample_drop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, required=True, help="folder of <case>_image/_label volumes")
    parser.add_argument("--dst", required=True, help="drop folder to write into (local or s3://)")
    parser.add_argument("--cases", nargs="*", default=None, help="case names (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed for UIDs and fake PHI")
    parser.add_argument(
        "--modality", action="append", default=[], help="CASE=CT|MR (default: guessed)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.src.is_dir():
        parser.error(f"--src {args.src}: no such folder")
    try:
        modalities = _parse_modalities(args.modality)
        cases = load_cases(args.src, args.cases)
    except (argparse.ArgumentTypeError, FileNotFoundError) as error:  # one line, no traceback
        parser.error(str(error))
    files = convert_volumes_to_drop(cases, seed=args.seed, modalities=modalities)
    DropFolderDataset(filepath=args.dst).save(files)
    logger.info("wrote %d files for %d cases to %s", len(files), len(cases), args.dst)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
