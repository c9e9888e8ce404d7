"""Command-line entry points: predict, secrets (the site key), sample_drop (real volumes to a
DICOM drop). The Kubernetes client has its own: python -m mvl_pipeline.k8s."""
