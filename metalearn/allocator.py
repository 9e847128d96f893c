"""Keep freed tensor memory in the process for reuse (glibc malloc), instead of returning it to the kernel.

Why: PyTorch's CPU tensors come from ``malloc``. With glibc's defaults a freed
multi-megabyte block is often returned to the kernel (unmapped, or trimmed off
the top of the heap), and the next step maps it again: every page of it
faults and is zeroed before it is written. A second-order W2 meta-step
(``bench/meta_step.py``) took 230-290 thousand page faults, about a gigabyte of
fresh pages per step, for both our loop and the textbook one; with the two
thresholds below it takes almost none and runs 15-20% faster, for about 10 MB
more peak memory. The price is that the process keeps its peak heap instead of
shrinking after it (freed memory is reused, not leaked).

``metalearn train``, ``metalearn eval`` and the service call
:func:`keep_freed_memory` with their device; call it once yourself
in your own training loop::

    import metalearn
    metalearn.keep_freed_memory()

It changes nothing on other C libraries, or when the environment already sets
glibc's malloc options (``GLIBC_TUNABLES`` with ``glibc.malloc``, or
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``): an explicit choice wins.
"""

from __future__ import annotations

import ctypes
import logging
import os

import torch

log = logging.getLogger("metalearn.allocator")

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3

# Blocks up to this size come from the heap and are reused; larger ones (rare: a whole Conv4
# activation of an 80-image task is 16 MB) are still mapped and unmapped.
MMAP_THRESHOLD = 256 << 20
# Free memory at the top of the heap kept before trimming it back to the kernel.
TRIM_THRESHOLD = 1 << 30

_applied: bool | None = None


def _explicit_setting() -> bool:
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return "glibc.malloc." in tunables or any(os.environ.get(name) for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))


def is_glibc() -> bool:
    """Whether this process runs on glibc (musl and others have no ``mallopt`` with these parameters)."""
    try:
        return hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    except OSError:
        return False


def keep_freed_memory(device: str | torch.device = "cpu") -> bool:
    """Set glibc's mmap and trim thresholds so freed tensor memory is reused without page faults.

    ``device``: where the caller computes; only CPU tensors come from ``malloc``, so
    for any other device this does nothing. Idempotent; returns whether the
    settings are in effect (False on non-glibc systems, for other devices, or when
    the environment sets malloc options itself).
    """
    global _applied
    if torch.device(device).type != "cpu":
        return False
    if _applied is not None:
        return _applied
    _applied = False
    if _explicit_setting():
        log.debug("malloc options come from the environment; leaving them alone")
        return False
    if not is_glibc():
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # Both or neither: setting one turns off glibc's dynamic adjustment of the other (the trim
    # threshold alone made a W2 step take 1.4 million page faults).
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
