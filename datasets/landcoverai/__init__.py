"""LandCover.ai v1, 512x512 tiles cut from the GeoTIFFs of landcover.ai.v1.zip (see README.md)."""
