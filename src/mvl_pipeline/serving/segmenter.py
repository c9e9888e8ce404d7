"""A trained model ready to segment whole studies: weights + plan + post-processing, loaded once.

The same steps as evaluation (``evaluation.scoring.predict_case``): the model's own plan
preprocesses the image, a sliding window predicts, the probabilities go back to the image's own
grid, and the stored post-processing decision is applied there.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mvl_pipeline.core.case import Case
from mvl_pipeline.core.errors import ImagingError
from mvl_pipeline.core.volume import Volume
from mvl_pipeline.evaluation.scoring import EvaluateConfig, predict_case, predict_cases
from mvl_pipeline.preprocessing.plan import plan_classes


class Segmenter:
    def __init__(
        self,
        weights: tuple[dict[str, Any], dict[str, Any]],
        plan: Mapping[str, Any],
        *,
        llm_cache_dir: str | Path,
        config: EvaluateConfig | None = None,
    ) -> None:
        from mvl_pipeline.model import model_from_weights

        state, model_config = weights
        self.model = model_from_weights(state, model_config, llm_cache_dir=llm_cache_dir)
        self.model.eval()
        self.plan = dict(plan)
        self.postprocessing = model_config.get("postprocessing")
        self.config = config or EvaluateConfig()
        self.classes = plan_classes(self.plan)

    def segment(self, image: Volume, modality: str) -> np.ndarray:
        """Integer labels (uint8) on ``image``'s own grid. A model of several input channels
        takes a channel-first image ``(C, X, Y, Z)`` in the plan's channel order (predict builds
        it by the plan's channel rules); other channels than the plan's: a ``ChannelError``."""
        return predict_case(
            self.model, _as_case(image, modality), self.plan, num_classes=self.model.cfg.num_classes,
            params=self.config, postprocessing=self.postprocessing,
        )  # fmt: skip

    def segment_many(self, inputs: Iterable[tuple[Hashable, Volume, str]]) -> Iterator[tuple[Hashable, np.ndarray]]:
        """``(key, labels)`` for every ``(key, image, modality)``, in order, each as
        :meth:`segment` gives it; images that fit in one window are predicted
        ``config.case_batch`` at a time (``evaluation.scoring.predict_cases``)."""
        cases = ((key, lambda image=image, modality=modality: _as_case(image, modality)) for key, image, modality in inputs)
        for key, _case, labels in predict_cases(
            self.model, cases, self.plan, num_classes=self.model.cfg.num_classes, params=self.config,
            postprocessing=self.postprocessing,
        ):  # fmt: skip
            yield key, labels


#: The fewest voxels along any axis of an image the segmenter takes: a 2-D image saved as a volume
#: (256x256x1) was segmented as if it were one. predict assembles no DICOM series of fewer slices.
MIN_EXTENT = 3


def _as_case(image: Volume, modality: str) -> Case:
    if min(image.shape) < MIN_EXTENT:
        raise ImagingError(f"the image is {'x'.join(map(str, image.shape))} voxels: the model segments 3-D volumes "
                           f"of at least {MIN_EXTENT} voxels along every axis (a 2-D image saved as a volume?)")  # fmt: skip
    volume = Volume(np.asarray(image.array, dtype=np.float32), image.affine, {"modality": modality})
    return Case("input", "input", volume, meta={"modality": modality})
