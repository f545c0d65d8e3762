"""Process-wide speed settings a user opts into: JAX's persistent compilation cache
(a second process starts fast) and a host allocator that keeps freed memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path
from typing import Optional

DEFAULT_DIR = Path(os.environ.get("ATTNJAX_CACHE", Path.home() / ".cache" / "attnjax" / "jax"))

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 1 << 30


def enable_compilation_cache(directory: Optional[os.PathLike] = None) -> Path:
    """Store compiled XLA programs on disk (JAX's persistent cache) and reuse them.

    Called by the command line and the benchmarks; a library user opts in. Returns
    the cache directory.
    """
    import jax

    path = Path(directory) if directory is not None else DEFAULT_DIR
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def tune_host_allocator(keep_bytes: int = _KEEP_BYTES) -> bool:
    """Let glibc's malloc reuse freed memory for large buffers instead of returning it.

    On the CPU backend every jitted call allocates its outputs afresh. glibc serves
    any block over 32 MiB (a stacked attention capture of MiniLM at 8 x 128 tokens is
    38 MiB) with a new mmap, and the kernel then faults in and zeroes every page:
    for that capture about 25 ms of a 165 ms forward on a 2-core CPU. Raising malloc's mmap and trim
    thresholds to ``keep_bytes`` makes those blocks come from the heap and be reused.
    The cost: up to ``keep_bytes`` of freed memory stays with the process.

    Process-wide (it also speeds up PyTorch in the same process), so a library user
    opts in; ``attnjax report`` and the benchmarks call it. Returns False, changing
    nothing, where the C library is not glibc (macOS, Windows, musl).
    """
    if not 0 < keep_bytes < 2**31:
        raise ValueError(f"keep_bytes={keep_bytes} must be between 1 and 2**31 - 1 (mallopt takes an int).")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, keep_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, keep_bytes))
