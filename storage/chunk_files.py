"""Whole chunks of uncompressed arrays written straight to the files of a local Zarr store.

Zarr's generic write path (codec pipeline, then a hand-off to a thread for every file) costs about
0.5 ms of CPU per chunk, and one extraction batch writes about 20 chunks, most of them small: that
was most of the cost of writing a batch. When an array's only codec is `bytes` (numbers: the
values as little-endian bytes) or `vlen-utf8` (strings: numcodecs' VLenUTF8, which is what Zarr
calls), Zarr's encoding of a chunk is that codec applied to the values padded to the chunk shape
with the fill value. `ChunkFile` writes exactly those bytes, atomically (a temporary file renamed
over the chunk, as Zarr's LocalStore does), for about a tenth of the cost. Every other array, and
every store that is not a local folder, goes through Zarr. The tests check the files are
byte-identical to Zarr's own.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
from numcodecs import VLenUTF8
from zarr.codecs import BytesCodec, VLenUTF8Codec
from zarr.core.array import AsyncArray
from zarr.storage import LocalStore


class ChunkFile:
    """Writes whole chunks (along the first axis) of one uncompressed array of a local store."""

    def __init__(self, array: AsyncArray, strings: bool) -> None:
        self.strings = strings
        self.dtype = np.dtype(object) if strings else np.dtype(array.dtype).newbyteorder("<")
        self.chunks = array.chunks
        self.fill = array.metadata.fill_value
        self.encode_key = array.metadata.encode_chunk_key
        self.folder = Path(array.store_path.store.root) / array.store_path.path
        self._made: set[Path] = set()

    @classmethod
    def for_array(cls, array: AsyncArray) -> ChunkFile | None:
        """A writer when `array` lives in a local folder and has one codec this module encodes."""
        meta = array.metadata
        if (not isinstance(array.store_path.store, LocalStore) or meta.zarr_format != 3
                or len(meta.codecs) != 1 or any(c != s for c, s in zip(array.chunks[1:], array.shape[1:]))):
            return None
        codec = meta.codecs[0]
        if isinstance(codec, BytesCodec) and array.dtype.kind in "biuf" and _little_endian(codec):
            return cls(array, strings=False)
        if isinstance(meta.codecs[0], VLenUTF8Codec):
            return cls(array, strings=True)
        return None

    def path(self, index: int) -> Path:
        return self.folder / self.encode_key((index,) + (0,) * (len(self.chunks) - 1))

    def encode(self, values: np.ndarray) -> bytes | memoryview:
        """The chunk's bytes: `values` (at most one chunk of rows) padded with the fill value."""
        values = np.asarray(values, dtype=self.dtype)
        if values.shape != self.chunks:
            padded = np.full(self.chunks, self.fill, dtype=self.dtype)
            padded[: len(values)] = values
            values = padded
        if self.strings:
            return _VLEN_UTF8.encode(values)
        return memoryview(np.ascontiguousarray(values)).cast("B")

    def write(self, index: int, values: np.ndarray) -> None:
        """Write chunk `index` (rows index·chunk … of the array) whole."""
        write_file(self.path(index), self.encode(values), self._made)


_VLEN_UTF8 = VLenUTF8()


def _little_endian(codec: BytesCodec) -> bool:
    """True when the codec stores little-endian bytes (or single bytes, which have no order)."""
    return codec.endian is None or getattr(codec.endian, "value", codec.endian) == "little"


def write_file(path: Path, data: bytes | memoryview, made: set[Path] | None = None) -> None:
    """Atomically replace `path` by `data`: a temporary file beside it, renamed over it."""
    folder = path.parent
    if made is None or folder not in made:
        folder.mkdir(parents=True, exist_ok=True)
        if made is not None:
            made.add(folder)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
