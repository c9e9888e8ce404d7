"""The names of the per-case metrics (``evaluation.metrics`` computes them with MONAI).

Apart so that the statistics (``summary``, ``gate``, ``ablation``) and the pipeline definitions
can name the metrics without importing torch and MONAI (~8 s on 2 cores)."""

from __future__ import annotations

METRICS = ("dice", "jaccard", "precision", "recall", "specificity", "accuracy", "hd95_mm", "nsd")
