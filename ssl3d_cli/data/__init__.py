"""NIfTI I/O with geometry, dataset discovery, preprocessing, the cache and synthetic data."""
