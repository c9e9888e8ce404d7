"""Run mvl_pipeline on Kubernetes: KubeRay RayJobs, scheduled retraining, deterministic run names.

The manifests live in ``k8s/`` (kustomize); this package is the small client around them:
``python -m mvl_pipeline.k8s submit | status | watch | trigger-retrain`` (see k8s/README.md).
"""
