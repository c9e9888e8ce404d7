"""Training: the per-worker loop (Ray Train's shape), patch sampling, augmentation, losses, the
fit configuration and the Ray driver."""
