"""DICOM: read and classify files, decode pixels, assemble series into volumes, read labels
(SEG, RTSTRUCT), write series and SEGs, de-identify (PS3.15 basic profile, keyed UIDs)."""
