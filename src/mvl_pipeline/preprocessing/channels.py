"""The channels of one study on one grid: each channel resampled onto the reference (first)
channel's grid in world coordinates, then stacked channel-first ``(C, X, Y, Z)``.

Channels already on the reference grid (the same shape and affine, e.g. the volumes of a 4-D
NIfTI, or series acquired with one geometry) are taken as they are; any other is sampled at the
reference voxel centres (:func:`~mvl_pipeline.preprocessing.resample.resample_onto`: linear for
images, nearest for labels). A channel that covers less than ``min_overlap`` of the reference
grid (or nothing of it) is an error (:class:`ChannelsDoNotOverlapError`): series that do not
overlap are not one study.
Reference voxels outside a channel's field of view get that channel's minimum.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mvl_pipeline.core.errors import ChannelsDoNotOverlapError
from mvl_pipeline.core.volume import Volume
from mvl_pipeline.preprocessing.resample import resample_onto


def onto_reference(volume: Volume, reference: Volume, *, is_label: bool = False, mode: str | None = None) -> tuple[np.ndarray, float]:
    """``volume``'s array on ``reference``'s grid and the fraction of the grid it covers."""
    if volume.same_grid(reference):
        return np.asarray(volume.array), 1.0
    return resample_onto(
        np.asarray(volume.array), volume.affine, reference.shape, reference.affine,
        mode=mode or ("nearest" if is_label else "linear"), is_label=is_label,
    )  # fmt: skip


def stack_channels(
    volumes: Sequence[Volume], names: Sequence[str], *, min_overlap: float = 0.5
) -> tuple[Volume, list[float]]:
    """One channel-first float32 volume on the first volume's grid, and each channel's coverage."""
    if len(volumes) != len(names) or not volumes:
        raise ValueError("stack_channels needs one name per volume, and at least one volume")
    reference = volumes[0]
    stacked = np.empty((len(volumes), *reference.shape), dtype=np.float32)
    coverages = []
    for index, (name, volume) in enumerate(zip(names, volumes, strict=True)):
        array, coverage = onto_reference(volume, reference)
        if coverage <= 0.0 or coverage < min_overlap:
            raise ChannelsDoNotOverlapError(
                f"channel {name!r} covers {coverage:.0%} of the reference channel's grid "
                f"({min_overlap:.0%} needed): the series do not overlap"
            )
        stacked[index] = array
        coverages.append(round(coverage, 4))
    return Volume(stacked, reference.affine.copy(), dict(reference.meta)), coverages


def label_onto_reference(label: Volume, reference: Volume) -> Volume:
    """A label volume placed on the reference grid (nearest; outside its field of view: 0)."""
    array, _ = onto_reference(label, reference, is_label=True)
    return Volume(np.ascontiguousarray(array), reference.affine.copy(), dict(label.meta))
