"""attnjax: see what attention inside a Transformer is doing, and where it goes wrong.

    import attnjax
    model = attnjax.load("minilm")
    trace = attnjax.run(model, "The cat sat on the mat.")
    trace.attention.shape   # (layers, batch, heads, query, key)
"""

from attnjax.api import load, run
from attnjax.cache import enable_compilation_cache, tune_host_allocator
from attnjax.kernels.stats import AttentionStats
from attnjax.models import CheckpointError, Model, UnsupportedConfigError
from attnjax.tokenize import Batch, tokenize
from attnjax.trace import Capture, Trace

__version__ = "0.1.0"

__all__ = [
    "AttentionStats", "Batch", "Capture", "CheckpointError", "Model", "Trace",
    "UnsupportedConfigError", "enable_compilation_cache", "load", "run", "tokenize",
    "tune_host_allocator",
]
