"""Datasets: metadata (classes, palette, ignore label), readers and the input pipeline."""

from lcseg.data.class_counts import count_class_pixels, split_class_counts, train_class_counts
from lcseg.data.metadata import DATASETS, IGNORE_LABEL, DatasetMetadata, get_metadata
from lcseg.data.sources import ExampleSource, open_split, prepare_dataset

__all__ = ["DATASETS", "IGNORE_LABEL", "DatasetMetadata", "ExampleSource",
           "count_class_pixels", "get_metadata", "open_split", "prepare_dataset",
           "split_class_counts", "train_class_counts"]
