"""LoveDA, from the Zenodo zips Train/Val/Test (see README.md)."""
