"""The activation store: one Zarr store per model, one group per (split, concept, hook).

    <out>/activations/<model>.zarr/
        concepts/<concept>/<hook>/   resid (token, d_model) float32 + token coordinates
        corpus/<hook>/               the SAE training corpus, same layout

Groups are written template-first: the full shapes, dtypes and coordinates go down as metadata,
then every batch fills its own chunk-aligned region and ticks its entry of `batch_done` (one chunk
per flag, so a flag is written atomically and only after its data). A group is complete when
every flag is set; an interrupted extraction re-runs only the batches whose flag is missing. In a
local folder the chunks are written as files directly (storage.chunk_files, byte-identical to
Zarr's own writes). Plain `xarray.open_zarr(store, group=...)` and `zarr.open_group` read every
group.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from zarr.core.sync import sync

from saema_core.errors import SaemaError
from storage.batches import BatchPlan, TokenBatch
from storage.chunk_files import ChunkFile
from storage.locations import canonical, is_local, local_path

_IDENTITY_KEYS = ("model", "model_revision", "d_model", "n_layers")


class StoreError(SaemaError):
    """A store that cannot be written or would be corrupted by mixing; the message says why."""


def model_slug(name: str) -> str:
    """A file-name-safe name for a model (`gpt2`, `EleutherAI__pythia-70m`, `my-folder`)."""
    base = Path(name).name if Path(name).expanduser().exists() else name.replace("/", "__")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", base) or "model"


def activation_store_url(out: str, model_name: str) -> str:
    """`<out>/activations/<model>.zarr`, a plain path when `out` is local (see storage.locations)."""
    return canonical(f"{out.rstrip('/')}/activations/{model_slug(model_name)}.zarr")


def group_path(hook: str, concept: str | None = None) -> str:
    """`concepts/<concept>/<hook>` for a concept, `corpus/<hook>` for the training corpus."""
    return f"concepts/{concept}/{hook}" if concept is not None else f"corpus/{hook}"


def ensure_output_dir(out: str) -> None:
    """Refuse an output path that is a file or cannot be written, before any work starts."""
    if not is_local(out):
        return
    path = local_path(out)
    if path.exists() and not path.is_dir():
        raise StoreError(f"output path {path} exists and is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".saema-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise StoreError(f"output folder {path} is not writable: {error}") from error


def open_store(url: str, identity: dict) -> zarr.Group:
    """Open (or create) a model's store; refuse one written by another model."""
    root = zarr.open_group(url, mode="a", use_consolidated=False)
    existing = {k: root.attrs.get(k) for k in _IDENTITY_KEYS}
    if any(v is not None for v in existing.values()):
        mismatched = {k: (existing[k], identity[k]) for k in _IDENTITY_KEYS if existing[k] != identity[k]}
        if mismatched:
            detail = "; ".join(f"{k}: store has {a!r}, this run {b!r}" for k, (a, b) in mismatched.items())
            raise StoreError(f"activation store {url} was written by another model ({detail}); "
                             f"refusing to mix — use another --out")
    else:
        root.attrs.update(identity)
    return root


_NUMERIC_COORDS = {"prompt_id": np.int64, "position": np.int64, "token_id": np.int64, "mask": bool}
# `item` and `source` say which concept item a token's prompt is about and where the prompt came from
# (empty in the corpus split); `concept` is one value per group (its fill value, never written).
_STRING_COORDS = ("token_str", "item", "source", "concept")
_WRITTEN_STRINGS = ("token_str", "item", "source")


#: How `resid` may be stored (`--corpus-dtype`; concept groups stay float32) → the Zarr array's dtype.
#: bfloat16 has no Zarr data type: its bits (float32 rounded to nearest even, upper half) are stored as
#: uint16 and widened back exactly on reading (`read_region`).
RESID_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def stored_resid(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 activations as the store holds them under `dtype` (a key of RESID_DTYPES)."""
    if dtype != "bfloat16":
        return np.asarray(values, dtype=RESID_DTYPES[dtype])
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def float32_resid(stored: np.ndarray) -> np.ndarray:
    """Stored activations back as float32 (bfloat16 bits widened exactly)."""
    if stored.dtype == np.uint16:
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(stored, dtype=np.float32)


def _template(plan: BatchPlan, d_model: int, attrs: dict, dtype: str = "float32") -> xr.Dataset:
    """Lazy dataset with the final shapes; writing it with compute=False writes metadata only."""
    n, chunk = plan.n_tokens, plan.chunk_tokens
    coords = {name: ("token", da.zeros(n, dtype=kind, chunks=chunk)) for name, kind in _NUMERIC_COORDS.items()}
    resid = da.zeros((n, d_model), dtype=RESID_DTYPES[dtype], chunks=(chunk, d_model))
    done = da.zeros(plan.n_batches, dtype=bool, chunks=1)
    about = {"long_name": "residual stream activation", "units": "1"}
    if dtype == "bfloat16":
        about["storage"] = "bfloat16 bits as uint16: widen with (uint32(v) << 16) viewed as float32"
    data = {
        "resid": (("token", "d_model"), resid, about),
        "batch_done": (("batch",), done, {"description": "True once the batch's rows are written"}),
    }
    return xr.Dataset(data, coords=coords, attrs=attrs)


# Stored uncompressed (like `token_str`), so batches go down as chunk files (storage.chunk_files):
# activations barely compress (float32 noise in the low bits) and the coordinates are 1-2 % of a
# group's bytes.
_PLAIN = ("resid", "batch_done", *_NUMERIC_COORDS)


def _write_template(url: str, path: str, plan: BatchPlan, d_model: int, attrs: dict, concept: str,
                    dtype: str = "float32") -> None:
    _template(plan, d_model, attrs, dtype).to_zarr(url, group=path, mode="w", compute=False, consolidated=False,
                                            encoding={name: {"compressors": None} for name in _PLAIN})
    # Variable-length strings go straight through zarr: xarray would load a lazy object array
    # into memory to find its dtype, which is O(corpus) memory.
    # `concept` is the same for every token of a group: it is the array's fill value, so its chunks
    # are never written and every reader sees the concept name.
    group = zarr.open_group(url, path=path, mode="r+", use_consolidated=False)
    for name, fill in (("token_str", ""), ("item", ""), ("source", ""), ("concept", concept)):
        group.create_array(name, shape=(plan.n_tokens,), chunks=(plan.chunk_tokens,), dtype=str,
                           fill_value=fill, dimension_names=("token",), compressors=None)
    coordinates = " ".join([*_NUMERIC_COORDS, *_STRING_COORDS])
    group["resid"].attrs["coordinates"] = coordinates


@dataclass
class GroupWriter:
    """Writes batches of one group into their chunk-aligned regions (one chunk per batch)."""

    url: str
    path: str
    plan: BatchPlan
    dtype: str = "float32"
    """How `resid` is stored (a key of RESID_DTYPES)."""

    def __post_init__(self) -> None:
        self.group = zarr.open_group(self.url, path=self.path, mode="r+", use_consolidated=False)
        # Open every array once (`group[name]` re-reads its metadata on each access); every region is
        # written whole, so skip Zarr's scan of each chunk for fill values.
        names = ("resid", "batch_done", *_NUMERIC_COORDS, *_WRITTEN_STRINGS)
        self.arrays = {name: self.group[name].async_array.with_config({"write_empty_chunks": True})
                       for name in names if name in self.group}
        # Uncompressed arrays of a local store are written as chunk files (storage.chunk_files).
        self.files = {name: f for name, a in self.arrays.items() if (f := ChunkFile.for_array(a)) is not None}

    def done(self) -> set[int]:
        """The batches written in full: flagged done, with every chunk still in the store (a chunk
        deleted or lost since makes its batch pending again, and only that batch is re-extracted)."""
        flagged = set(np.flatnonzero(sync(self.arrays["batch_done"].getitem(slice(None)))).tolist())
        return flagged - lost_batches(self.group, flagged)

    def write_files(self, index: int, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Write the values that have a chunk file now; return the rest (for Zarr)."""
        for name in self.files.keys() & values.keys():
            self.files[name].write(index, values[name])
        return {name: v for name, v in values.items() if name not in self.files}

    async def write_zarr(self, index: int, values: dict[str, np.ndarray]) -> None:
        """Write the values of batch `index` through Zarr (its chunk `index` of every array)."""
        await asyncio.gather(*(self.arrays[name].setitem(self._region(name, index, len(v)), v)
                               for name, v in values.items()))

    def _region(self, name: str, index: int, n: int) -> slice:
        start = index * (1 if name == "batch_done" else self.plan.chunk_tokens)
        return slice(start, start + n)


def write_batch(parts: Sequence[tuple[GroupWriter, np.ndarray | None]], batch: TokenBatch) -> None:
    """Write one batch's activations (one array per group) and its token coordinates into every group,
    then each group's `batch_done` flag (only after all the data, so an interrupted write leaves the
    batch to be redone). Activations None: a streamed batch, whose coordinates alone are stored.

    Uncompressed arrays of a local store go down as chunk files (storage.chunk_files); the rest in one
    trip to Zarr's I/O loop (a synchronous `array[...] = v` costs a round trip each).
    """
    coords = batch.coords()
    _write_parts([(writer, {**({} if resid is None else {"resid": stored_resid(resid, writer.dtype)}),
                            **{k: v for k, v in coords.items() if k in writer.arrays}})
                  for writer, resid in parts], batch.index)
    _write_parts([(writer, {"batch_done": np.ones(1, dtype=bool)}) for writer, _ in parts], batch.index)


def _write_parts(parts: list[tuple[GroupWriter, dict[str, np.ndarray]]], index: int) -> None:
    rest = [(writer, writer.write_files(index, values)) for writer, values in parts]
    if any(values for _, values in rest):
        async def write_rest() -> None:
            await asyncio.gather(*(writer.write_zarr(index, values) for writer, values in rest if values))
        sync(write_rest())


def prepare_group(url: str, path: str, plan: BatchPlan, d_model: int, attrs: dict,
                  concept: str = "", refresh: bool = False, dtype: str = "float32") -> GroupWriter:
    """Create the group from its template, or reopen it; refuse a group written for other inputs.

    `dtype`: how `resid` is stored (RESID_DTYPES); a stored group of another dtype is refused too."""
    root = zarr.open_group(url, mode="a", use_consolidated=False)
    if path in root and refresh:
        _delete_group(url, root, path)
    if path in root:
        found = root[path].attrs.get("content_hash")
        stored = root[path].attrs.get("dtype", "float32")
        if stored != dtype:
            raise StoreError(f"{url}/{path} holds {stored} activations, this run asks for {dtype} (--corpus-dtype); "
                             f"re-run with --refresh to replace them, or use another --out")
        if found != plan.content_hash:
            raise StoreError(
                f"{url}/{path} holds activations of other inputs (content hash {found}, this run "
                f"{plan.content_hash}: prompts, corpus or batch layout changed); refusing to mix — "
                f"re-run with --refresh to replace it, or use another --out"
            )
    else:
        full_attrs = {**attrs, "content_hash": plan.content_hash, "seq_len": plan.seq_len,
                      "batch_rows": plan.batch_rows}
        _write_template(url, path, plan, d_model, full_attrs, concept, dtype)
    return GroupWriter(url, path, plan, dtype)


def _delete_group(url: str, root: zarr.Group, path: str) -> None:
    if is_local(url):
        shutil.rmtree(local_path(url) / path)
    else:
        del root[path]


def lost_batches(group: zarr.Group, flagged: set[int]) -> set[int]:
    """The batches among `flagged` (flagged done) whose chunk of any always-written array is gone.

    Every batch writes one chunk of `resid` and of each numeric coordinate (write_empty_chunks), so
    a missing chunk file is data lost after the flag was set — not a fill value."""
    async def chunk_indices(name: str) -> set[int]:
        prefix = f"{group.path}/{name}/c/".lstrip("/")
        return {int(key[len(prefix):].split("/")[0]) async for key in group.store.list_prefix(prefix)}

    async def present() -> list[set[int]]:
        return await asyncio.gather(*(chunk_indices(name) for name in ("resid", *_NUMERIC_COORDS)))

    if not flagged:
        return set()
    resid, *coords = sync(present())
    streamed = set(range(int(group.attrs.get("streamed_batches", 0))))  # their `resid` is never written
    return set.union(flagged - streamed - resid, *(flagged - indices for indices in coords))


def group_complete(url: str, path: str) -> bool:
    """True when the group exists, every batch flag is set and no flagged batch lost a chunk."""
    try:
        group = zarr.open_group(url, path=path, mode="r", use_consolidated=False)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return False
    flags = group["batch_done"][:]
    return bool(np.all(flags)) and not lost_batches(group, set(range(len(flags))))


def content_hash(url: str, hook: str, concept: str | None = None) -> str:
    """What a complete group holds, as a cache-key input: the model revision and the group's content
    hash (tokens, masks, layout)."""
    path = group_path(hook, concept)
    if not group_complete(url, path):
        raise StoreError(f"{url}/{path} is missing or incomplete; run `saema extract` for it first")
    attrs = zarr.open_group(url, path=path, mode="r", use_consolidated=False).attrs
    return f"{attrs['model_revision']}/{attrs['content_hash']}"


def concept_prompt_set(url: str, hook: str, concept: str) -> str:
    """The fingerprint of a concept group's prompts (`Concept.prompt_set`; "" when not recorded)."""
    try:
        attrs = zarr.open_group(url, path=group_path(hook, concept), mode="r", use_consolidated=False).attrs
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return ""
    return str(attrs.get("prompt_set", ""))


def concept_source(url: str, hook: str, concept: str) -> str:
    """Where a concept group's prompts came from, with its analysed-token count ("" when unknown)."""
    try:
        attrs = zarr.open_group(url, path=group_path(hook, concept), mode="r", use_consolidated=False).attrs
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return ""
    source, n, floor = str(attrs.get("concept_source", "")), attrs.get("n_analysed"), attrs.get("min_concept_tokens")
    if n is not None and floor is not None and n < floor:
        source += f" — BELOW the floor: {n} analysed tokens, fewer than {floor}"
    return source


def open_activations(url: str, hook: str, concept: str | None = None) -> xr.Dataset:
    """Lazily open one complete group as an xarray Dataset; refuse an incomplete one.

    The variables are lazily indexed Zarr arrays, not Dask arrays: the stages read them inside Dask
    tasks, where computing a Dask array would make the task leave its worker's thread slot (so a
    one-thread worker would run several tasks at once) and send a graph through the scheduler.
    """
    path = group_path(hook, concept)
    if not group_complete(url, path):
        raise StoreError(f"{url}/{path} is missing or incomplete; run `saema extract` for it first")
    return xr.open_zarr(url, group=path, consolidated=False, chunks=None)


def held_out_chunks(n_chunks: int, holdout_fraction: float) -> int:
    """How many of a corpus's `n_chunks` chunks (its last ones) are held out of SAE training."""
    return max(1, round(n_chunks * holdout_fraction)) if n_chunks > 1 else 0


def streamed_tokens(url: str, hook: str) -> int:
    """How many leading tokens of the corpus group have no stored activations: they are recomputed by
    the model's forward whenever they are read for training (`--stream-corpus`; 0 for a stored corpus)."""
    group = zarr.open_group(url, path=group_path(hook), mode="r", use_consolidated=False)
    return int(group.attrs.get("streamed_batches", 0)) * group["resid"].chunks[0]


def corpus_chunks(url: str, hook: str, holdout_fraction: float) -> tuple[list[slice], list[slice]]:
    """The corpus group's chunk regions, split into training and held-out (the last chunks).

    A streamed corpus (`--stream-corpus`) fixed its split when it was extracted (only the held-out
    chunks hold activations); another `holdout_fraction` is refused."""
    group = zarr.open_group(url, path=group_path(hook), mode="r", use_consolidated=False)
    n, chunk = group["resid"].shape[0], group["resid"].chunks[0]
    regions = [slice(start, min(start + chunk, n)) for start in range(0, n, chunk)]
    n_holdout = held_out_chunks(len(regions), holdout_fraction)
    streamed = int(group.attrs.get("streamed_batches", 0))
    if streamed and streamed != len(regions) - n_holdout:
        raise StoreError(f"{url}/{group_path(hook)} was extracted with --stream-corpus, storing the activations of "
                         f"its last {len(regions) - streamed} of {len(regions)} chunks as the held-out set; a held-out "
                         f"fraction of {holdout_fraction} asks for {n_holdout}. Re-extract it with --refresh, or keep "
                         f"the fraction it was extracted with")
    return regions[: len(regions) - n_holdout], regions[len(regions) - n_holdout :]


def read_region(url: str, hook: str, region: slice, concept: str | None = None) -> np.ndarray:
    """Analysed-token activations (mask True) of one region, float32 (tokens, d_model)."""
    group = zarr.open_group(url, path=group_path(hook, concept), mode="r", use_consolidated=False)
    streamed = int(group.attrs.get("streamed_batches", 0)) * group["resid"].chunks[0]
    if region.start < streamed:  # chunks never written would read as zeros
        raise StoreError(f"{url}/{group_path(hook, concept)}: tokens {region.start}–{region.stop} were streamed "
                         f"(--stream-corpus), not stored; read them through tasks.training_tokens")
    resid, mask = group["resid"][region], group["mask"][region]
    return np.ascontiguousarray(float32_resid(resid[mask]))


def read_token_ids(url: str, hook: str, region: slice) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and analysed-token mask of one corpus region, as (sequences, seq_len) arrays."""
    group = zarr.open_group(url, path=group_path(hook), mode="r", use_consolidated=False)
    seq_len = int(group.attrs["seq_len"])
    return group["token_id"][region].reshape(-1, seq_len), group["mask"][region].reshape(-1, seq_len)


def training_batches(url: str, hook: str, regions: list[slice], batch_size: int, seed: int,
                     window: int = 8, read: Callable[[slice], np.ndarray] | None = None) -> Iterator[np.ndarray]:
    """Endless shuffled minibatches of analysed corpus tokens; memory bounded by `window` chunks.

    Every epoch visits the chunks in a new seeded order, `window` chunks at a time, shuffles their
    tokens and yields full batches (the remainder carries over to the next window). `read` gives a
    region's analysed activations (default `read_region`; a streamed corpus passes its forward).
    """
    if not regions:
        raise StoreError(f"{url}/{group_path(hook)} has no training chunks")
    read = read or (lambda region: read_region(url, hook, region))
    rng = np.random.default_rng(seed)
    carry = np.empty((0, 0), dtype=np.float32)
    while True:
        order = rng.permutation(len(regions))
        for start in range(0, len(order), window):
            tokens = [read(regions[i]) for i in order[start : start + window]]
            pool = np.concatenate([carry, *tokens]) if carry.size else np.concatenate(tokens)
            pool = pool[rng.permutation(len(pool))]
            n_full = len(pool) // batch_size * batch_size
            for row in range(0, n_full, batch_size):
                yield pool[row : row + batch_size]
            carry = pool[n_full:]
