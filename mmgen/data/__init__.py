"""Datasets and deterministic batch order."""
