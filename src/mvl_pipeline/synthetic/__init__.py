"""Synthetic data that proves plumbing, never quality: CT phantoms and the seeded sample drop."""
