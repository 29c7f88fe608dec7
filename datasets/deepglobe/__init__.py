"""DeepGlobe Land Cover Classification, from the Kaggle download (see README.md)."""
