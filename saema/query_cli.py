"""`saema query` and `saema report`: read the results store from the command line.

    saema query --out DIR                                   # what every group holds
    saema query --out DIR --group stratification --hook blocks.3.hook_resid_post --format csv
    saema query --out DIR --group sae_eval --var explained_variance --by-layer --sel sae=sae
    saema query --out DIR --group structure --format parquet --output structure.parquet   # a tidy table
    saema query --out DIR --format netcdf --output results.nc      # every group, one netCDF-4 group each
    saema report --out DIR                                  # DIR/report.html, self-contained
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from flows.config import DEFAULT_OUT
from storage.result_groups import GROUPS

if TYPE_CHECKING:  # pandas, xarray and the store load when a query runs, not for `saema --help`
    import pandas as pd
    import xarray as xr

FORMATS = ("table", "csv", "json", "parquet", "netcdf")
FILE_FORMATS = ("parquet", "netcdf")
"""Binary formats: written to --output, never to the terminal."""
TABLE_ROWS = 50
"""Rows a `table` prints when no --limit is given (csv and json print everything)."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def add_query_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder or fsspec URL (default: {DEFAULT_OUT})")
    parser.add_argument("--group", choices=GROUPS, default=None,
                        help="results group to print; without it, a summary of every group")
    parser.add_argument("--model", nargs="+", default=None, help="keep only these models")
    parser.add_argument("--hook", nargs="+", default=None, help="keep only these hooks, e.g. blocks.3.hook_resid_post")
    parser.add_argument("--concept", nargs="+", default=None, help="keep only these concepts")
    parser.add_argument("--var", dest="variables", nargs="+", default=None, metavar="NAME",
                        help="variables to print (default: all but per-token ones larger than 200k cells)")
    parser.add_argument("--by-layer", action="store_true",
                        help="compare across models and layers: the one --var against block depth, a column "
                             "per model (other dims fixed with --sel or averaged)")
    parser.add_argument("--sel", nargs="+", default=[], metavar="DIM=VALUE",
                        help="keep one label of any dimension, e.g. space=latent noise=0.1 (with --by-layer: "
                             "fix the dimensions not compared, e.g. sae=sae)")
    parser.add_argument("--format", choices=FORMATS, default="table",
                        help="table, csv or json on stdout; parquet (the tidy table) or netcdf (the groups as "
                             "xarray datasets, netCDF-4) into --output (default: %(default)s)")
    parser.add_argument("--output", default=None, metavar="PATH",
                        help="write to this file instead of stdout (needed for parquet and netcdf)")
    parser.add_argument("--limit", type=_positive_int, default=None,
                        help=f"print at most N rows (default: {TABLE_ROWS} for table, all for csv/json)")


def _sizes(ds: xr.Dataset) -> str:
    return ", ".join(f"{dim}: {size}" for dim, size in ds.sizes.items())


def summary_frame(groups: dict[str, xr.Dataset]) -> pd.DataFrame:
    """One row per (group, variable): its dims, shape, dtype, units and description."""
    import pandas as pd

    rows = [{"group": name, "variable": str(var), "dims": "×".join(map(str, ds[var].dims)),
             "shape": "×".join(map(str, ds[var].shape)), "dtype": str(ds[var].dtype),
             "units": str(ds[var].attrs.get("units", "")), "description": str(ds[var].attrs.get("description", ""))}
            for name, ds in groups.items() for var in ds.data_vars]
    return pd.DataFrame(rows, columns=["group", "variable", "dims", "shape", "dtype", "units", "description"])


def _emit(frame: pd.DataFrame, fmt: str, limit: int | None, output: str | None = None) -> None:
    """Write a frame as csv or json records (NaN → empty / null) to stdout, or as csv, json or parquet
    to the file `output`."""
    frame = frame if limit is None else frame.head(limit)
    if output is not None:
        _write_file(output, lambda path: _FRAME_WRITERS[fmt](frame, path))
    elif fmt == "csv":
        frame.to_csv(sys.stdout, index=False)
    else:
        sys.stdout.write(frame.to_json(orient="records", force_ascii=False) + "\n")


_FRAME_WRITERS = {"csv": lambda frame, path: frame.to_csv(path, index=False),
                  "json": lambda frame, path: frame.to_json(path, orient="records", force_ascii=False),
                  "parquet": lambda frame, path: frame.to_parquet(path, index=False)}


def _write_file(output: str, write) -> None:
    """`write(path)` into a temporary file beside `output`, renamed into place: a failed export leaves
    no half-written file (and an earlier export of the same name intact)."""
    import os
    from pathlib import Path

    target = Path(output).expanduser()
    partial = target.with_name(f".{target.name}.partial")
    try:
        write(str(partial))
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    print(f"saema query: wrote {target}", file=sys.stderr)


def _print_table(title: str, frame: pd.DataFrame, limit: int) -> None:
    print(f"== {title} ==")
    print(frame.head(limit).to_string(index=False, max_colwidth=70))
    if len(frame) > limit:
        print(f"… {limit} of {len(frame)} rows shown (--limit N for more, --format csv for all)")
    print()


def _print_summary(groups: dict[str, xr.Dataset], fmt: str, limit: int | None, output: str | None = None) -> None:
    frame = summary_frame(groups)
    if fmt != "table":
        _emit(frame, fmt, limit, output)
        return
    for name, ds in groups.items():
        rows = frame[frame.group == name].drop(columns="group")
        _print_table(f"{name} ({_sizes(ds)})", rows, limit or TABLE_ROWS)


def _print_group(name: str, ds: xr.Dataset, args: argparse.Namespace) -> None:
    from saema.api import to_frame

    frame = to_frame(ds, args.variables)
    if frame.attrs["skipped"]:
        print(f"saema query: left out large variables {frame.attrs['skipped']}; name them with --var",
              file=sys.stderr)
    if args.format == "table":
        _print_table(f"{name} ({_sizes(ds)})", frame, args.limit or TABLE_ROWS)
    else:
        _emit(frame, args.format, args.limit, args.output)


def _export_netcdf(result, args: argparse.Namespace) -> None:
    """The selected group (or every group) as xarray datasets in one netCDF-4 file."""
    from saema.api import write_netcdf

    if args.limit is not None:
        raise ValueError("--limit counts table rows; netcdf exports datasets (select with --sel, --model …)")
    groups = result if isinstance(result, dict) else {args.group: result[args.variables] if args.variables else result}
    _write_file(args.output, lambda path: write_netcdf(groups, path))


def run_query(args: argparse.Namespace) -> int:
    """Print one group as a tidy table (or every group's summary); errors are ResultsError (ValueError)."""
    from saema.api import query
    from storage.results import incomplete_warning

    if args.variables and args.group is None:
        raise ValueError("--var needs --group (variables belong to one group)")
    if args.format in FILE_FORMATS and not args.output:
        raise ValueError(f"--format {args.format} writes a file: give --output PATH")
    if args.output and args.format == "table":
        raise ValueError("--output writes csv, json, parquet or netcdf: give --format")
    result = query(args.out, args.group, model=args.model, hook=args.hook, concept=args.concept)
    if args.by_layer:
        return _print_by_layer(result, args)
    if args.sel:
        result = _select_labels(result, args.group, _labels(args.sel))
    for line in incomplete_warning(args.out).splitlines():
        print(f"saema query: warning: {line}", file=sys.stderr)
    if args.format == "netcdf":
        _export_netcdf(result, args)
    elif isinstance(result, dict):
        _print_summary(result, args.format, args.limit, args.output)
    else:
        _print_group(args.group, result, args)
    return 0


def _labels(items: list[str]) -> dict[str, str]:
    pairs = [item.partition("=") for item in items]
    bad = [item for item, (key, sep, value) in zip(items, pairs) if not (key and sep and value)]
    if bad:
        raise ValueError(f"--sel expects DIM=VALUE, got {' '.join(bad)}")
    return {key: value for key, _, value in pairs}


def _select_labels(result, group: str | None, labels: dict[str, str]):
    """--sel DIM=VALUE on any dimension of the group (every group that has it, without --group)."""
    from saema.api import select

    groups = {group: result} if group else result
    known = {str(dim) for ds in groups.values() for dim in ds.dims}
    unknown = sorted(set(labels) - known)
    if unknown:
        raise ValueError(f"--sel: no dimension {', '.join(unknown)} in {group or 'any group'}; "
                         f"dimensions: {', '.join(sorted(known))}")
    selected = {name: select(ds, name, labels) for name, ds in groups.items()}
    return selected[group] if group else selected


def _print_by_layer(ds: xr.Dataset, args: argparse.Namespace) -> int:
    if args.group is None or not args.variables or len(args.variables) != 1:
        raise ValueError("--by-layer needs --group and exactly one --var")
    from saema.api import by_layer

    table = by_layer(ds, args.variables[0], **_labels(args.sel))
    if table.attrs["averaged_over"]:
        print(f"saema query: averaged over {', '.join(table.attrs['averaged_over'])} (fix them with --sel)",
              file=sys.stderr)
    frame = table.reset_index()
    if args.format == "table":
        _print_table(f"{args.group}.{args.variables[0]} by layer", frame, args.limit or TABLE_ROWS)
    elif args.format == "netcdf":
        raise ValueError("--by-layer prints a table; use --format csv, json or parquet")
    else:
        _emit(frame, args.format, args.limit, args.output)
    return 0


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder or fsspec URL (default: {DEFAULT_OUT})")
    parser.add_argument("--output", default=None, metavar="PATH",
                        help="where to write the HTML report (default: <out>/report.html)")


def run_report(args: argparse.Namespace) -> int:
    """Write the self-contained HTML report and print its path."""
    from storage.report import write_report  # matplotlib is only needed here

    print(f"report written to {write_report(args.out, args.output)}")
    return 0
