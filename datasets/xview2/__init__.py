"""xView2 building footprints, from the xview2.org tar.gz archives (see README.md)."""
