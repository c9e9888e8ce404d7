"""NIfTI-1/2 bytes <-> :class:`~mvl_pipeline.core.volume.Volume` (nibabel).

The loaded affine maps voxel ``(i, j, k)`` to RAS+ millimetres (NIfTI stores RAS+: sform, else
qform). ``Volume.meta`` (JSON) travels inside the file as a comment extension (code 6) whose text
is ``mvl_pipeline.volume/1 {"meta": ..., "affine": ...}`` (the float64 affine too, since the
header keeps only float32; used when it agrees with the header to 1e-3 mm). Files written by other
tools load with ``meta == {}``. ``.nii.gz`` is written deterministically (no timestamp).
A multi-channel volume ``(C, X, Y, Z)`` is stored as NIfTI's 4-D ``(X, Y, Z, C)`` and read back
channel-first when the caller asks for channels (otherwise a 4-D file is not a volume).
"""

from __future__ import annotations

import gzip
import json
from typing import Any

import numpy as np

from mvl_pipeline.core.volume import Volume
from mvl_pipeline.formats.codec import VolumeFileError, as_3d, make_volume, storable

NIFTI_META_CODE = 6  # NIFTI_ECODE_COMMENT


NIFTI_META_PREFIX = b"mvl_pipeline.volume/1 "


def header_geometry(path: str) -> dict[str, Any] | None:
    """The geometry fields of a NIfTI file's header (sform and qform with their codes), read
    without its voxels; None when it is not a readable NIfTI file. A file written on the same voxel
    grid with these fields (:func:`encode_nifti`'s ``geometry``) lies where the source does in every
    viewer, also in those that read the qform where the two disagree."""
    import nibabel as nib

    try:
        header = nib.load(path).header
        return {
            "sform": np.asarray(header.get_sform(), dtype=np.float64).tolist(),
            "sform_code": int(header["sform_code"]),
            "qform": np.asarray(header.get_qform(), dtype=np.float64).tolist(),
            "qform_code": int(header["qform_code"]),
        }
    except Exception:  # noqa: BLE001 - not NIfTI (NRRD), or unreadable: the affine alone is written
        return None


def geometry_disagreement_mm(geometry: dict[str, Any], shape: tuple[int, ...]) -> float:
    """How far apart (mm) a header's sform and qform put the corners of a voxel grid of ``shape``,
    the largest over the corners, when both are set; 0 otherwise."""
    if not (geometry.get("sform_code") and geometry.get("qform_code")):
        return 0.0
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    apart = corners @ (np.asarray(geometry["sform"]) - np.asarray(geometry["qform"])).T
    return float(np.linalg.norm(apart[:, :3], axis=1).max())


def encode_nifti(
    volume: Volume, *, compress: bool, compresslevel: int = 6, geometry: dict[str, Any] | None = None
) -> bytes:
    """NIfTI-1 bytes (gzip-compressed when ``compress``) holding ``volume`` and its meta.
    ``geometry`` (:func:`header_geometry` of a file on the same voxel grid): its sform, qform and
    codes are written as they are, instead of ``volume.affine`` in both with code 1."""
    import nibabel as nib

    array = storable(volume.array)
    if array.ndim == 4:  # channel-first in memory, channels last in the file (NIfTI's 4th axis)
        array = np.moveaxis(array, 0, -1)  # a view: nibabel writes it in file order in one copy
    image = nib.Nifti1Image(array, volume.affine, dtype=array.dtype)
    if geometry is None:
        image.header.set_sform(volume.affine, code=1)
        image.header.set_qform(volume.affine, code=1)
    else:
        image.header.set_sform(np.asarray(geometry["sform"]), code=int(geometry["sform_code"]))
        image.header.set_qform(np.asarray(geometry["qform"]), code=int(geometry["qform_code"]))
    image.header.set_xyzt_units("mm")
    payload = json.dumps(
        {"meta": dict(volume.meta), "affine": volume.affine.tolist()}, sort_keys=True
    ).encode("utf-8")
    image.header.extensions.append(
        nib.nifti1.Nifti1Extension(NIFTI_META_CODE, NIFTI_META_PREFIX + payload)
    )
    raw = image.to_bytes()
    return gzip.compress(raw, compresslevel=compresslevel, mtime=0) if compress else raw


def decode_nifti(data: bytes, *, compressed: bool, path: str, channels: bool = False) -> Volume:
    """Parse NIfTI-1/2 bytes into a Volume; :class:`VolumeFileError` naming ``path`` if bad.
    With ``channels``, a 4-D image is a channel-first multi-channel volume."""
    import nibabel as nib

    try:
        raw = gzip.decompress(data) if compressed else data
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise VolumeFileError(f"not a readable gzip file ({exc})", path=path) from exc
    if len(raw) < 348:
        raise VolumeFileError(f"too short for a NIfTI header ({len(raw)} bytes)", path=path)
    sizeof_hdr = {int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")}
    if 540 in sizeof_hdr:
        klass: Any = nib.Nifti2Image
    elif 348 in sizeof_hdr:
        klass = nib.Nifti1Image
    else:
        raise VolumeFileError("not a NIfTI file (bad header size field)", path=path)
    try:
        image = klass.from_bytes(raw)
        magic = bytes(image.header["magic"])[:3]
        if magic not in (b"n+1", b"n+2", b"ni1", b"ni2"):
            raise ValueError(f"bad NIfTI magic {magic!r}")
        array = np.asanyarray(image.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt or truncated data
        raise VolumeFileError(f"not a readable NIfTI volume ({exc})", path=path) from exc
    array = as_3d(array, path, channels=channels)
    affine = np.asarray(image.affine, dtype=np.float64)
    meta: dict[str, Any] = {}
    for extension in image.header.extensions:
        content = extension.get_content()
        if extension.get_code() == NIFTI_META_CODE and content.startswith(NIFTI_META_PREFIX):
            stored = json.loads(content[len(NIFTI_META_PREFIX) :].decode("utf-8"))
            meta = dict(stored.get("meta", {}))
            exact = np.asarray(stored.get("affine", affine), dtype=np.float64)
            if exact.shape == (4, 4) and np.allclose(exact, affine, atol=1e-3):
                affine = exact
    return make_volume(array, affine, meta, path)
