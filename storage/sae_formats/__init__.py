"""Readers of the ecosystem's SAE checkpoint formats; `storage.sae_checkpoints` is the public entry point.

`common` holds the shared error type, file readers and tensor checks; `saelens`, `dictionary_learning`
and `sparsify` each convert one format to a `ConvertedCheckpoint` with SAELens tensor names.
"""
