"""TFDS builders of the datasets lcseg trains on, one package per dataset."""
