"""mvl_pipeline: hospital imaging studies to a registered MedVisionLlama segmentation model."""

__version__ = "0.1.0"
