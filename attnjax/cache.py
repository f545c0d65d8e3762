"""JAX's persistent compilation cache, so a second process starts fast."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

DEFAULT_DIR = Path(os.environ.get("ATTNJAX_CACHE", Path.home() / ".cache" / "attnjax" / "jax"))


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
