"""Attention kernels behind one function, ``attnjax.kernels.attention``.

Implementations (all tested against ``reference``):

- ``"reference"``  plain jnp, the full T x T matrix; the truth, small sizes only;
- ``"blockwise"``  XLA online-softmax loops, O(T) memory, any backend (default on CPU);
- ``"pallas"``     Pallas kernels: Triton on GPU, Mosaic on TPU, and the Pallas
                   interpreter on any other backend (slow; for tests);
- ``"auto"``       Pallas on GPU/TPU (blockwise for float64 inputs), blockwise elsewhere;
- a callable       a custom attention function, called as
                   ``impl(q, k, v, mask=mask, causal=causal, scale=scale)`` (mask a
                   bool array or None, scale the resolved float), plus
                   ``window=W`` and/or ``softcap=c`` only when those are set (so a
                   function that does not know them keeps working for calls that do
                   not use them); k and v may have fewer heads than q (GQA); its result
                   is returned as is (it cannot produce statistics).

``attention`` validates its arguments once (``spec.normalize``) and hands each
implementation's core ``(q, k, v, mask, spec)``: ``reference_core``,
``blockwise_core``, ``pallas_core``. The public ``reference_attention``,
``blockwise_attention`` and ``pallas_attention`` are thin keyword wrappers over the
same two steps. Semantics shared by all of them (GQA, causal, window, softcap) are
documented in ``attnjax.kernels.spec`` and ``attnjax.kernels.reference``; the
statistics in ``attnjax.kernels.stats.AttentionStats``.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

from attnjax.kernels.blockwise import BlockSizes as BlockwiseBlockSizes
from attnjax.kernels.blockwise import blockwise_attention, blockwise_core
from attnjax.kernels.pallas_attention import BlockSizes as PallasBlockSizes
from attnjax.kernels.pallas_attention import pallas_attention, pallas_core
from attnjax.kernels.reference import (
    MASK_VALUE,
    masked_softmax,
    reference_attention,
    reference_attention_weights,
    reference_core,
    reference_stats,
    visible_keys,
    weighted_values,
)
from attnjax.kernels.spec import AttentionSpec, keyword_entry, normalize
from attnjax.kernels.stats import AttentionStats

__all__ = [
    "IMPLEMENTATIONS",
    "MASK_VALUE",
    "AttentionSpec",
    "AttentionStats",
    "BlockwiseBlockSizes",
    "PallasBlockSizes",
    "attention",
    "masked_softmax",
    "normalize",
    "blockwise_attention",
    "pallas_attention",
    "pallas_core",
    "reference_attention",
    "reference_attention_weights",
    "reference_core",
    "blockwise_core",
    "reference_stats",
    "resolve_impl",
    "visible_keys",
    "weighted_values",
]

IMPLEMENTATIONS = ("auto", "reference", "blockwise", "pallas")
_ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")


def resolve_impl(impl: str, dtype=jnp.float32, head_dim: Optional[int] = None) -> str:
    """The concrete implementation ``impl`` names here: "auto" is Pallas on GPU/TPU
    (except for float64 inputs, which the compiled kernels do not take) and blockwise
    elsewhere. Given ``head_dim``, "auto" also checks once per process that the Pallas
    kernels compile on this accelerator for that dtype and head size, and falls back to
    blockwise with a warning if they do not."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(
            f"attention(impl={impl!r}) is not an implementation; expected one of "
            f"{', '.join(repr(name) for name in IMPLEMENTATIONS)} or a callable "
            "impl(q, k, v, mask=..., causal=..., scale=...).")
    if impl == "auto":
        accelerated = jax.default_backend() in _ACCELERATORS and jnp.dtype(dtype) != jnp.float64
        if accelerated and head_dim is not None:
            accelerated = pallas_compiles(jax.default_backend(), jnp.dtype(dtype).name, int(head_dim))
        return "pallas" if accelerated else "blockwise"
    return impl


# Shape of the compile check: two sequence blocks' worth of tokens, a padding mask,
# causal, statistics with a pooled map, and the backward kernels; once for plain
# multi-head attention and once with grouped-query heads (2 per kv head), a sliding
# window shorter than the sequence and a soft cap.
_PROBE_LENGTH = 256
_PROBE_SPECS = (
    dict(heads=1, kv_heads=1, window=None, softcap=None),
    dict(heads=2, kv_heads=1, window=96, softcap=30.0),
)


@functools.lru_cache(maxsize=None)
def pallas_compiles(backend: str, dtype: str, head_dim: int) -> bool:
    """Whether every Pallas kernel (forward, statistics, backward) compiles here, for
    multi-head attention and for GQA with a window and a soft cap."""
    dtype = jnp.dtype(dtype)
    mask = jax.ShapeDtypeStruct((1, _PROBE_LENGTH), jnp.bool_)

    def forward_and_grad(mask, *qkvs):
        results = []
        for (q, k, v), probe in zip(qkvs, _PROBE_SPECS):
            spec = AttentionSpec(scale=1.0 / head_dim ** 0.5, causal=True, window=probe["window"],
                                 softcap=probe["softcap"], groups=probe["heads"] // probe["kv_heads"])
            stats_spec = dataclasses.replace(spec, stats=True, pool=4)
            out, stats = pallas_core(q, k, v, mask, stats_spec)
            loss = lambda q, k, v: jnp.sum(pallas_core(q, k, v, mask, spec).astype(jnp.float32))
            results.append((out, stats, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))
        return results

    shapes = []
    for probe in _PROBE_SPECS:
        q = jax.ShapeDtypeStruct((1, _PROBE_LENGTH, probe["heads"], head_dim), dtype)
        kv = jax.ShapeDtypeStruct((1, _PROBE_LENGTH, probe["kv_heads"], head_dim), dtype)
        shapes.append((q, kv, kv))
    try:
        jax.jit(forward_and_grad).lower(mask, *shapes).compile()
        return True
    except Exception as error:  # Triton/Mosaic refusing a tile, shared memory, an old GPU, ...
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        warnings.warn(
            f"attnjax: the Pallas attention kernels do not compile on this {backend} for "
            f"{dtype.name}, head_dim {head_dim} ({type(error).__name__}: {first_line}); "
            "attention(impl='auto') uses the XLA blockwise kernels instead. Pass "
            "impl='pallas' to see the full error.",
            RuntimeWarning, stacklevel=3)
        return False


def _dispatch(q, k, v, mask, spec: AttentionSpec, *, impl: Union[str, Callable] = "auto"):
    """``attention`` after validation: the implementation ``impl`` names, on ``spec``."""
    if callable(impl):
        if spec.stats:
            raise ValueError(
                "attention(stats=True) with a custom attention function: custom attention "
                "functions cannot produce stats (AttentionStats are computed inside attnjax's "
                "own kernels). Use impl='auto', 'blockwise', 'pallas' or 'reference'.")
        extra = {name: value for name, value in (("window", spec.window), ("softcap", spec.softcap))
                 if value is not None}
        return impl(q, k, v, mask=mask, causal=spec.causal, scale=spec.scale, **extra)
    name = resolve_impl(impl, q.dtype, q.shape[-1])
    if name == "reference":
        result = reference_core(q, k, v, mask, spec)
        if not spec.stats:
            return result
        out, statistics = result
        # Every implementation's statistics carry no gradient (the kernels' VJPs cover
        # the output only), so the choice of impl never changes a gradient.
        return out, jax.lax.stop_gradient(statistics)
    if name == "blockwise":
        return blockwise_core(q, k, v, mask, spec)
    return pallas_core(q, k, v, mask, spec)


# attention(q, k, v, *, mask=None, causal=False, scale=None, window=None, softcap=None,
#           stats=False, pool=None, impl="auto"): the one front door.
attention = keyword_entry(_dispatch, name="attention", doc="""\
Softmax attention, optionally with streaming statistics.

q: (batch, seq, heads, head_dim); k, v: (batch, seq, kv_heads, head_dim), where
kv_heads divides heads (grouped-query attention; query head h reads kv head
``h // (heads // kv_heads)``, as transformers' repeat_kv; multi-query is
kv_heads = 1; the repeated K/V are never built). mask: (batch, seq) bool
key-padding mask, True at real tokens (a False key is invisible to every query;
queries themselves are not masked). causal: key j visible to query i only if
j <= i. window=W (needs causal): key j visible to query i only if i - W < j <= i,
the W most recent keys including the query itself (Hugging Face's sliding window);
kernels skip key blocks outside it, so a windowed layer costs O(T W). softcap=c:
scores become ``c * tanh(s / c)`` before masking (Gemma 2); the statistics see the
capped scores and gradients flow through the tanh. scale defaults to
1 / sqrt(head_dim). Scores are ``scale * q.k``.

Returns the output (batch, seq, heads, head_dim) in q's dtype; with ``stats=True``,
``(output, AttentionStats)`` whose per-query arrays are (batch, heads, seq), per
query head, ``received`` (batch, heads, seq) sums over non-padding queries only, and
with ``pool=P`` ``pooled`` is (batch, heads, P, P). A query with no visible key gets
a zero output row and all-zero statistics. Statistics are float32 (float64 for
float64 inputs) and carry no gradient; the output is differentiable.

``impl``: "auto", "reference", "blockwise", "pallas" or a callable (see the
module docstring). "pallas" on CPU runs the Pallas interpreter (slow).
""")
