"""Kubernetes glue: CRDs generated from the API models, and what the operator builds and applies."""
