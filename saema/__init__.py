"""saema: SAE Manifold Analyzer (arXiv 2505.22506) as a Prefect/Dask/Zarr pipeline."""

__version__ = "0.1.0"
