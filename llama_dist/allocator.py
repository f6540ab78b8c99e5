"""Keep freed memory in the process for CPU training, where every step allocates the same sizes again.

glibc's malloc gives blocks above its mmap threshold straight back to the kernel and
trims the top of its heap once enough of it is free, so each step faults its
activations and gradients in afresh, a zeroed 4 KiB page at a time: on the small
config at one thread that was ~0.25-0.33 s of system time in a ~5 s step. Fixing both
thresholds keeps blocks up to 32 MiB (glibc's ceiling for the mmap threshold) for reuse;
larger ones (the logits, the embedding's gradient) still come from the kernel.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses a larger one on 64-bit systems
NEVER_TRIM = 2**31 - 1  # mallopt takes a C int


def keep_freed_memory() -> bool:
    """True once glibc's malloc keeps freed blocks; False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process already uses
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # musl and others: their malloc has other knobs
    kept = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)
    return bool(kept)
