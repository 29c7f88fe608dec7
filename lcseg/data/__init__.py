"""Datasets: metadata (classes, palette, ignore label), readers and the input pipeline."""

from lcseg.data.metadata import DATASETS, IGNORE_LABEL, DatasetMetadata, get_metadata
from lcseg.data.sources import ExampleSource, open_split, prepare, train_class_counts

__all__ = ["DATASETS", "IGNORE_LABEL", "DatasetMetadata", "ExampleSource", "get_metadata",
           "open_split", "prepare", "train_class_counts"]
