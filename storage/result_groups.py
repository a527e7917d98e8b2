"""The groups of the results store, importable without xarray or Zarr (the command line's choices)."""

GROUPS = ("stratification", "strata", "structure", "intervention", "causal", "sae_eval", "findings")
