"""The pipeline config: its schema, cross-field checks, loading and validation, value helpers."""
