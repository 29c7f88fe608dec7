"""Synthetic land-cover scenes (no download needed)."""
