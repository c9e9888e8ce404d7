"""nnU-Net-style preprocessing, array level: dataset fingerprint -> plan -> crop, resample,
normalise (and back: restore_to_original), plus the stable patient split."""
