"""Medical Segmentation Decathlon task descriptors (``dataset.json``): the one reader.

A task folder holds ``dataset.json`` (``name``, ``modality`` {channel index: name}, ``labels``
{value: name}, ``training`` [{image, label}], ``test`` [image]) and ``imagesTr/``, ``labelsTr/``,
``imagesTs/``. Paths in the descriptor are relative to the task folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

#: The image contrasts an MSD ``modality`` name may give (compared lower-case, without "-", "_"
#: or spaces). A name is free text typed where the task was made: it becomes the channel's name
#: in the plan, the model bundle and predict's matching, so any other ("MRI St Elsewhere")
#: becomes ``channel<index>``.
CHANNEL_TERMS = frozenset({
    "ct", "mr", "mri", "pet", "spect", "t1", "t1w", "t1gd", "t1c", "t1ce", "t1post", "t1pre", "t2", "t2w",
    "t2star", "t2*", "flair", "adc", "dwi", "trace", "pd", "pdw", "swi", "dce", "dsc", "bold", "hbv", "b0",
    "b1000", "mprage", "cbf", "cbv",
})  # fmt: skip


def channel_name(index: int, name: str) -> str:
    """``name`` when it is one of :data:`CHANNEL_TERMS`, else ``channel<index>``."""
    key = "".join(str(name).split()).replace("-", "").replace("_", "").lower()
    return str(name).strip() if key in CHANNEL_TERMS else f"channel{int(index)}"


class MsdDescriptorError(ValueError):
    """``dataset.json`` is not a readable MSD task descriptor."""


@dataclass(frozen=True)
class MsdTask:
    name: str
    labels: Mapping[int, str]  # value -> name (0 = background)
    modalities: Mapping[int, str]  # channel index -> name (e.g. {0: "MRI"}, {0: "FLAIR", 1: "T1w" ...})
    training: tuple[tuple[str, str | None], ...] = field(default=())  # (image, label) relative paths
    test: tuple[str, ...] = field(default=())  # images without labels (imagesTs)

    @property
    def channel_names(self) -> tuple[str, ...]:
        """The volumes' names in index order, each kept only if :func:`channel_name` keeps it."""
        return tuple(channel_name(index, name) for index, name in sorted(self.modalities.items()))

    @property
    def modality(self) -> str | None:
        """One channel: its modality name upper-cased (``MRI`` -> ``MR``); several: ``MULTI``."""
        if not self.modalities:
            return None
        if len(self.modalities) > 1:
            return "MULTI"
        name = str(next(iter(self.modalities.values()))).upper()
        return {"MRI": "MR"}.get(name, name)


def read_task(descriptor: bytes) -> MsdTask:
    """Parse ``dataset.json``; :class:`MsdDescriptorError` when it is not a task descriptor."""
    try:
        spec = json.loads(descriptor)
        labels = {int(k): str(v) for k, v in (spec.get("labels") or {}).items()}
        modalities = {int(k): str(v) for k, v in (spec.get("modality") or {}).items()}
        training = tuple(
            (str(e["image"]), str(e["label"]) if e.get("label") else None)
            for e in spec.get("training", []) if isinstance(e, dict) and e.get("image")
        )  # fmt: skip
        test = tuple(str(e) for e in spec.get("test", []) if isinstance(e, str) and e)
    except (ValueError, AttributeError, TypeError, KeyError) as exc:
        raise MsdDescriptorError(str(exc)[:200]) from exc
    return MsdTask(str(spec.get("name", "")), labels, modalities, training, test)
