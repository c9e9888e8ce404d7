"""A case: one study's image volume, its label volume and PHI-free metadata.

``case_id`` and ``patient_id`` are keyed pseudonyms made by the ingest pipeline (never the
hospital's identifiers); ``patient_id`` groups the studies of one patient for the split.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mvl_pipeline.core.errors import LabelGridMismatchError
from mvl_pipeline.core.volume import Volume


@dataclass(frozen=True)
class Case:
    case_id: str
    patient_id: str
    image: Volume
    label: Volume | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.label is not None and not self.image.same_grid(self.label):
            raise LabelGridMismatchError(
                f"label grid {self.label.shape} does not match image grid {self.image.shape}",
                path=self.case_id,
            )

    @property
    def modality(self) -> str:
        return str(self.meta.get("modality", self.image.meta.get("modality", "OT")))

    @property
    def label_names(self) -> dict[int, str]:
        """Label value -> name (0 is background), as recorded at ingest."""
        names = self.meta.get("label_names", {})
        return {int(k): str(v) for k, v in names.items()}
