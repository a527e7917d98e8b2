"""Keep freed heap memory in the process instead of handing it back to the OS after every batch.

A forward of a 2 048-token batch allocates and frees about 100 MiB of activations. With glibc's
defaults the freed top of the heap is trimmed (and large blocks are unmapped) after each forward, so
the next forward faults the same pages in again: about 25 000 minor page faults, 10-15 % of a
MiniLM forward on this machine's CPUs. The SAEMA cells do the same with their noise, latents and
Gram matrices (470 000 faults for the default stratification grid, 10 % of its time). Fixing the
thresholds keeps the pages for reuse (BENCHMARKS.md). Peak memory is unchanged (it is what the
largest batch or cell needs); only the trimming stops. PyTorch's CPU tuning guide makes the same
point by recommending jemalloc or tcmalloc. The extraction and the parallel stages' tasks call
`keep_freed_memory` on entry.

No-op where the C library is not glibc (macOS, musl): those allocators are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_TRIM_THRESHOLD = 1 << 30  # freed heap kept up to 1 GiB
_MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to 32 MiB come from the (reused) heap

_lock = threading.Lock()
_state = {"applied": None}


def keep_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds once per process; True when they are in effect."""
    with _lock:
        if _state["applied"] is None:
            _state["applied"] = _set_thresholds()
        return _state["applied"]


def _set_thresholds() -> bool:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)) and bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))


#: The environment variable of `--encode-elements`: read by every task that encodes, in the CLI's process
#: and in the Dask workers it starts (a remote cluster's workers need it in their own environment).
ENCODE_ELEMENTS_ENV = "SAEMA_ENCODE_ELEMENTS"


def encode_elements() -> int:
    """SAE pre-activations (tokens × d_sae) a task holds at once when it encodes: `$SAEMA_ENCODE_ELEMENTS`,
    else `saema_core.sae.sparse.ENCODE_ELEMENTS` (2²⁴, 64 MiB of float32). The latents do not depend on
    it (`encode_csr` equals `encode` at any chunking), so it is a memory setting, not a cache key."""
    from saema_core.sae.sparse import ENCODE_ELEMENTS

    value = os.environ.get(ENCODE_ELEMENTS_ENV, "").strip()
    if not value:
        return ENCODE_ELEMENTS
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"${ENCODE_ELEMENTS_ENV} (--encode-elements) must be a whole number ≥ 1, got {value!r}")
    return int(value)


def set_encode_elements(n: int | None) -> None:
    """`--encode-elements`: set the budget for this process and the workers it starts (None: leave it)."""
    if n is None:
        return
    if n < 1:
        raise ValueError(f"--encode-elements must be ≥ 1, got {n}")
    os.environ[ENCODE_ELEMENTS_ENV] = str(n)
