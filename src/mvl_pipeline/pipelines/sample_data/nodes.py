"""The ``sample_data`` node: the seeded synthetic hospital drop (mvl_pipeline.synthetic)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydicom.dataset import Dataset

from mvl_pipeline.synthetic.sample_drop import SampleDataConfig
from mvl_pipeline.synthetic.sample_drop import generate_sample_drop as _generate


def generate_sample_drop(params: Mapping[str, Any]) -> dict[str, Dataset]:
    """Relative path -> DICOM data set of the sample drop (same seed, same bytes)."""
    return _generate(SampleDataConfig.from_params(params))
