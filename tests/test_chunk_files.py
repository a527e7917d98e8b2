"""Chunk files written by storage.chunk_files are byte-for-byte what Zarr writes; the kept heap."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from zarr.codecs import BytesCodec

from storage.chunk_files import ChunkFile, write_file


def _array(root: Path, name: str, shape, chunks, dtype, compressors=None):
    group = zarr.open_group(root, mode="a")
    fill = "fill" if dtype == "str" else 1  # not zero: padding a partial chunk must use it
    return group.create_array(name, shape=shape, chunks=chunks, dtype=str if dtype == "str" else dtype,
                              compressors=compressors, fill_value=fill).async_array


def _values(shape, dtype, seed):
    numbers = np.random.default_rng(seed).normal(size=shape) * 50
    if dtype == "str":
        return np.array([["", "Ġthe", "##ing", "é", "[CLS]"][int(abs(x)) % 5] + str(int(x)) for x in numbers.flat],
                        dtype=object).reshape(shape)
    return numbers.astype(dtype)


def _chunk_bytes(root: Path, name: str) -> dict[str, bytes]:
    folder = root / name / "c"
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), chunk=st.integers(1, 16), width=st.integers(0, 5),
       dtype=st.sampled_from(["float32", "int64", "bool", "uint8", "str"]))
def test_chunk_files_are_byte_identical_to_zarr(tmp_path_factory, rows, chunk, width, dtype):
    root = tmp_path_factory.mktemp("chunks")
    shape, chunks = ((rows, width), (chunk, width)) if width and dtype != "str" else ((rows,), (chunk,))
    values = _values(shape, dtype, rows * 31 + chunk)
    ours = ChunkFile.for_array(_array(root / "ours", "x", shape, chunks, dtype))
    # Zarr's own writes, as the activation store makes them (every chunk written, even all-fill).
    theirs = zarr.Array(_array(root / "zarr", "x", shape, chunks, dtype).with_config({"write_empty_chunks": True}))
    assert ours is not None
    for index, start in enumerate(range(0, rows, chunk)):  # the last chunk may be partial
        ours.write(index, values[start : start + chunk])
        theirs[start : start + chunk] = values[start : start + chunk]
    assert _chunk_bytes(root / "ours", "x") == _chunk_bytes(root / "zarr", "x")
    np.testing.assert_array_equal(zarr.open_array(root / "ours", path="x")[:], values.astype(str) if dtype == "str" else values)


def test_only_plain_local_arrays_get_chunk_files(tmp_path):
    assert ChunkFile.for_array(_array(tmp_path, "plain", (8,), (4,), "int64")) is not None
    assert ChunkFile.for_array(_array(tmp_path, "zstd", (8,), (4,), "int64", compressors="auto")) is None
    assert ChunkFile.for_array(_array(tmp_path, "split", (8, 6), (4, 3), "float32")) is None
    big_endian = zarr.open_group(tmp_path, mode="a").create_array(
        "big", shape=(8,), chunks=(4,), dtype="int64", serializer=BytesCodec(endian="big"), compressors=None)
    assert ChunkFile.for_array(big_endian.async_array) is None
    assert ChunkFile.for_array(_array(tmp_path, "strings", (8,), (4,), "str")) is not None
    assert ChunkFile.for_array(_array(tmp_path, "zstd-strings", (8,), (4,), "str", compressors="auto")) is None
    memory = zarr.open_group(zarr.storage.MemoryStore(), mode="w").create_array(
        "m", shape=(8,), chunks=(4,), dtype="int64", compressors=None)
    assert ChunkFile.for_array(memory.async_array) is None


def test_a_failed_write_keeps_the_old_chunk_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "c" / "0"
    write_file(target, b"old")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_file(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["0"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_refaulting_a_reallocated_heap():
    """Allocate 96 MiB in 12 MiB blocks, touch, free, three times: under glibc's defaults every round
    faults its pages in again (the freed heap went back to the OS); with the thresholds kept, only the
    first round does."""
    script = textwrap.dedent("""
        import ctypes, resource, sys
        from tasks.allocator import keep_freed_memory
        if sys.argv[1] == "keep":
            assert keep_freed_memory()
        libc = ctypes.CDLL(None)
        libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
        size = 12 << 20
        def faults_of_one_round():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            blocks = [libc.malloc(size) for _ in range(8)]
            for block in blocks:
                ctypes.memset(block, 1, size)
            for block in blocks:
                libc.free(block)
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        print(*[faults_of_one_round() for _ in range(3)])
    """)

    def faults(mode: str) -> list[int]:
        result = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                                check=True, cwd=Path(__file__).parents[1])
        return [int(n) for n in result.stdout.split()]

    pages = (96 << 20) // os.sysconf("SC_PAGE_SIZE")
    default, kept = faults("default"), faults("keep")
    assert min(default) > pages // 2  # every round faults the 96 MiB in again
    assert kept[0] > pages // 2 and max(kept[1:]) < pages // 50
