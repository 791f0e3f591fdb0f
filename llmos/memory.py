"""What the process's memory holds: the C heap in use against what the allocator keeps free.

Resident memory alone cannot tell a leak from fragmentation. Under steady load (tests/test_load.py,
32 clients), llmos's resident memory grew by ~80 MiB over 8 minutes while the bytes in use stayed
at ~170-190 MiB: glibc's malloc arenas kept freed chunks it could not give back (free: 39 ->
160 MiB). /metrics reports both, so an operator sees which one grows.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class HeapStats:
    in_use: int  # bytes handed out by malloc and not freed (arenas and mmapped chunks)
    free: int  # bytes the arenas hold free: reusable, but resident once touched
    mmapped: int  # of in_use, in chunks mapped on their own (returned to the system on free)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@cache
def _mallinfo2() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2  # glibc 2.33+; musl and older glibc have none
    except (OSError, AttributeError):
        return None
    fn.restype = _Mallinfo2
    fn.argtypes = []
    return fn


def heap() -> HeapStats | None:
    """The C heap of this process (glibc's mallinfo2; None where there is none). Python's small
    objects live in its own arenas, outside these figures (``sys.getallocatedblocks()`` counts them)."""
    fn = _mallinfo2()
    if fn is None:
        return None
    m = fn()
    return HeapStats(in_use=m.uordblks + m.hblkhd, free=m.fordblks, mmapped=m.hblkhd)


@cache
def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim  # glibc
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_size_t]
    return fn


def trim() -> None:
    """Give the pages the C heap holds free back to the system (glibc's malloc_trim(0): the top of
    each arena, and whole free pages in the middle of it). What the arenas keep free after large
    tensors come and go is what made resident memory grow under steady load while the memory in
    use did not (see the module's docstring). A few milliseconds; a no-op without glibc."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)


def freeze_startup_objects() -> None:
    """Move what the process holds now (modules, models, tokenizer: about 450k objects with the
    built-in model) out of the cyclic garbage collector's reach. A full collection walks every
    tracked object while holding the GIL: 250 ms here, a stall of every request and the trainer
    (the likely cause of a 282 ms gap between two tokens in a swap benchmark). Refcounting still
    frees these objects: a model and its training state (optimizer included) hold no reference
    cycles, so version 0's go when later versions replace them; only garbage in cycles stays."""
    gc.collect()
    gc.freeze()
