"""Synthetic building-footprint scenes (no download needed)."""
