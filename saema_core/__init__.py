"""saema_core: the pure computation of saema (no Prefect, no Zarr, no paths).

Everything here works on numpy arrays, torch tensors and torch modules, and can be tested with
three-element arrays.
"""
