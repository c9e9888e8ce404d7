"""The ingest engine (Kedro-free): a hospital drop -> units -> de-identified cases or quarantine
records, incremental against a manifest keyed by pseudonyms."""
