"""The core every other package stands on: Volume and Case (array + geometry + PHI-free meta),
orientation, the imaging errors with their quarantine reasons, the parameter-block builder, the
pseudonymisation key and keyed pseudonyms, content hashes, atomic fsspec storage and the worker
rule. Imports nothing else of the project."""
