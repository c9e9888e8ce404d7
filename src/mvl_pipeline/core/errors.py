"""Errors raised on bad input, each with a machine-readable ``reason`` for quarantine records.

Every error names the offending path (or a pseudonymous case id) and never carries PHI: a message
may quote file paths of the drop only before de-identification, and the ingest pipeline records
only the ``reason`` and a PHI-free ``detail`` downstream.
"""

from __future__ import annotations


def without_path(exc: BaseException) -> str:
    """An error for a log: the operating system's own errors (an ``OSError`` with a ``filename``)
    quote the path, which may name the patient, so only their kind and reason are kept."""
    if isinstance(exc, OSError) and (exc.filename is not None or exc.filename2 is not None):
        return f"{type(exc).__name__}: {exc.strerror or 'error'} (the path is not repeated: it may name a patient)"
    return str(exc)


class ImagingError(Exception):
    """Base class: bad or unsupported imaging input. ``reason`` is a stable snake_case code."""

    reason = "imaging_error"

    def __init__(self, detail: str, *, path: str | None = None) -> None:
        self.detail = detail
        self.path = path
        super().__init__(f"{detail} [{path}]" if path else detail)


class UnreadableFileError(ImagingError):
    """The file is missing, truncated, or not in the expected format."""

    reason = "unreadable_file"


class NotDicomError(UnreadableFileError):
    """The file is not a DICOM Part 10 file (nor a preamble-less DICOM data set)."""

    reason = "not_dicom"


class NoPixelDataError(ImagingError):
    reason = "no_pixel_data"


class NoDecoderError(ImagingError):
    """Pixel data in a transfer syntax for which no installed plugin has a decoder."""

    reason = "no_decoder"


class NotAnImageError(ImagingError):
    """A non-image object (SR, RTPLAN, presentation state ...): skipped, with this reason."""

    reason = "not_an_image"


class EmptySeriesError(ImagingError):
    """A folder or series with no image slices."""

    reason = "no_slices"


class TooFewSlicesError(ImagingError):
    reason = "too_few_slices"


class InconsistentGeometryError(ImagingError):
    """Slices disagree on orientation or pixel spacing, or positions are not on one line."""

    reason = "inconsistent_geometry"


class MixedSliceSizeError(InconsistentGeometryError):
    reason = "mixed_slice_sizes"


class MissingSliceError(InconsistentGeometryError):
    """A gap in the slice positions larger than the series' regular spacing."""

    reason = "missing_slices"


class UnevenSpacingError(InconsistentGeometryError):
    reason = "uneven_slice_spacing"


class DuplicatePositionError(InconsistentGeometryError):
    """Several slices (e.g. several acquisitions) at one position."""

    reason = "duplicate_slice_positions"


class LabelGridMismatchError(ImagingError):
    """A label volume does not lie on its image's voxel grid."""

    reason = "label_grid_mismatch"


class UnknownLabelValueError(ImagingError):
    reason = "label_values_not_in_label_map"


class EmptyImageError(ImagingError):
    """An image whose voxels are all equal (nothing to learn from)."""

    reason = "empty_image"


class NonFiniteValuesError(ImagingError):
    reason = "non_finite_values"


class ImplausibleGeometryError(ImagingError):
    """Voxel spacing no scanner makes (e.g. a header in metres), or a case that resampling to the
    plan's spacing would blow up beyond memory."""

    reason = "implausible_geometry"


class NotAVolumeError(UnreadableFileError):
    """A volume file that holds something other than one 3-D volume (e.g. a 4-D image of several
    channels or time points)."""

    reason = "not_3d_volume"


# -- input channels (several MR contrasts or CT phases as one case: core/channels.py) ---------
class ChannelError(ImagingError):
    """A case's declared input channels cannot be assembled (``ingest.channels``)."""

    reason = "channel_error"


class MissingChannelError(ChannelError):
    """A declared channel has no source (no series matches its rule, a 4-D image too short):
    the case is incomplete, never a silently shorter input. The detail names the channel."""

    reason = "missing_channel"


class AmbiguousChannelError(ChannelError):
    """Several series (or volumes) of one study match one channel's rule."""

    reason = "ambiguous_channel"


class ChannelFrameMismatchError(ChannelError):
    """A channel's series lies in another Frame of Reference than the reference channel's: its
    coordinates cannot be compared, so it cannot be resampled onto the reference grid."""

    reason = "channel_frame_mismatch"


class ChannelsDoNotOverlapError(ChannelError):
    """A channel covers too little of the reference channel's grid (``ingest.channel_min_overlap``)."""

    reason = "channels_do_not_overlap"
