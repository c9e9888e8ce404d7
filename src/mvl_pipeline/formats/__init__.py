"""File formats, each read and written by one module: volumes (NIfTI, NRRD), MSD task
descriptors, the model bundle."""
