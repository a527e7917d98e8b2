"""tasks of saema (see DESIGN.md §2)."""

from tasks import quiet_errors

quiet_errors.install()  # in every process that runs saema's tasks, Dask workers included
