"""attnjax: see what attention inside a Transformer is doing, and where it goes wrong.

    import attnjax
    model = attnjax.load("minilm")
    trace = attnjax.run(model, "The cat sat on the mat.")
    trace.attention.shape   # (layers, batch, heads, query, key)

Decoders (GPT-2, and llama / mistral / qwen2 / qwen3 / gemma / gemma2 directories)
load the same way; ``attnjax.load(path, dtype="bfloat16")`` halves a decoder's memory,
and ``model.forward(..., logits="last" | "none")`` avoids (T, vocab) logits.
"""

from attnjax.api import load, run
from attnjax.cache import enable_compilation_cache, tune_host_allocator
from attnjax.chat import spans_from_chat, spans_from_text
from attnjax.generate import Generation, generate
from attnjax.kernels.stats import AttentionStats
from attnjax.models import CheckpointError, Model, UnsupportedConfigError, is_decoder
from attnjax.parallel import data_mesh
from attnjax.tokenize import Batch, tokenize
from attnjax.trace import Capture, Trace

__version__ = "0.1.0"
_LAZY = {"profile": "attnjax.profiling", "skipped_texts": "attnjax.profiling"}


def __getattr__(name):
    """attnjax.profile and attnjax.skipped_texts import pandas and the analyses on first use,
    so `import attnjax` (and the report command's start-up) stays light."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'attnjax' has no attribute {name!r}")


def explore(model, text=None, **options):
    """Interactive attention explorer for notebooks (attnjax.explorer.explore; needs ipywidgets)."""
    from attnjax.explorer import DEFAULT_TEXT, explore as _explore  # lazy: pulls in Altair and pandas

    return _explore(model, DEFAULT_TEXT if text is None else text, **options)


__all__ = [
    "AttentionStats", "Batch", "Capture", "CheckpointError", "Generation", "Model", "Trace",
    "UnsupportedConfigError", "data_mesh", "enable_compilation_cache", "explore", "generate", "is_decoder",
    "load", "profile", "run", "skipped_texts", "spans_from_chat", "spans_from_text", "tokenize",
    "tune_host_allocator",
]
