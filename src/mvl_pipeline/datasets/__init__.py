"""Kedro datasets only: thin adapters (fsspec, atomic saves) over the domain packages."""
