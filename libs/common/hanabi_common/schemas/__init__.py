"""Vendored JSON schemas (OCI runtime-spec)."""
