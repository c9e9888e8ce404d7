"""Label names of a source (SEG segments, RTSTRUCT ROIs, dataset.json) mapped onto the project's
label map, by name (case-insensitive, through ``ingest.label_aliases``)."""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from mvl_pipeline.core.errors import UnknownLabelValueError
from mvl_pipeline.core.volume import Volume
from mvl_pipeline.ingestion.config import IngestConfig


def canonical_label(name: str, config: IngestConfig) -> str:
    lowered = name.strip().lower()
    return config.aliases.get(lowered, lowered)


def map_label_names(names: Mapping[int, str], config: IngestConfig) -> dict[int, int]:
    """Source label value -> project label value, by name. Unknown names raise. Without a
    project label map (``ingest.labels: {}``) the source's own values are kept."""
    if not config.labels:
        return {int(v): int(v) for v in names if int(v) != 0}
    table = {k.lower(): int(v) for k, v in config.labels.items()}
    mapping = {}
    for value, name in names.items():
        if int(value) == 0:
            continue
        canonical = canonical_label(str(name), config)
        if canonical not in table:
            # the source's name is not shown: a segment's label is free text, typed at the
            # hospital, and may hold a name or a date
            raise UnknownLabelValueError(
                f"the name of label {int(value)} is not in the label map {sorted(table)} "
                "(nor an ingest.label_aliases entry)"
            )
        mapping[int(value)] = table[canonical]
    return mapping


def remap_labels(label: Volume, mapping: Mapping[int, int]) -> Volume:
    values = np.unique(label.array)
    unknown = [int(v) for v in values if v != 0 and int(v) not in mapping]
    if unknown:
        raise UnknownLabelValueError(f"label values {unknown} have no entry in the label map")
    lut = np.zeros(int(values.max()) + 1 if values.size else 1, dtype=np.uint8)
    for source, target in mapping.items():
        if source < lut.size:
            lut[source] = target
    return Volume(lut[label.array.astype(np.int64)], label.affine, {})


#: A source's label name a case may keep (without a project label map): a few words of letters.
#: A name is free text typed at the hospital ("Liver (Kowalczyk, read 2024-03-05)"); it travels
#: into the plan, the model bundle, MLflow metric names and every later prediction's DICOM SEG.
#: Digits, punctuation (but - _ /) and long names are replaced by "label <value>".
SAFE_LABEL_NAME = re.compile(r"[a-z][a-z _/-]{0,31}")


def safe_label_name(value: int, name: str) -> str:
    """``name`` (canonical) if it is a few words of letters, else ``"label <value>"``."""
    return name if SAFE_LABEL_NAME.fullmatch(name) and len(name.split()) <= 4 else f"label {int(value)}"


def case_label_names(names: Mapping[int, str], config: IngestConfig) -> dict[int, str]:
    """The label names a case records: the project's whole map, or (without one) the source's
    names of the values it uses, canonicalised, each kept only if :func:`safe_label_name` keeps it."""
    if config.labels:
        return config.label_names
    return {int(v): safe_label_name(int(v), canonical_label(str(name), config)) for v, name in names.items() if int(v) != 0}
