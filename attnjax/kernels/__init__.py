"""Attention kernels behind one function, ``attnjax.kernels.attention``.

Implementations (all tested against ``reference``):

- ``"reference"``  plain jnp, the full T x T matrix; the truth, small sizes only;
- ``"blockwise"``  XLA online-softmax loops, O(T) memory, any backend (default on CPU);
- ``"pallas"``     Pallas kernels: Triton on GPU, Mosaic on TPU, and the Pallas
                   interpreter on any other backend (slow; for tests);
- ``"auto"``       Pallas on GPU/TPU (blockwise for float64 inputs), blockwise elsewhere;
- a callable       a custom attention function, called as
                   ``impl(q, k, v, mask=mask, causal=causal, scale=scale)``; its result
                   is returned as is (it cannot produce statistics).

Semantics shared by all of them are documented in ``attnjax.kernels.reference``;
the statistics in ``attnjax.kernels.stats.AttentionStats``.
"""

from __future__ import annotations

import functools
import numbers
import warnings
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

from attnjax.kernels.blockwise import BlockSizes as BlockwiseBlockSizes
from attnjax.kernels.blockwise import blockwise_attention
from attnjax.kernels.pallas_attention import BlockSizes as PallasBlockSizes
from attnjax.kernels.pallas_attention import pallas_attention
from attnjax.kernels.reference import (
    MASK_VALUE,
    masked_softmax,
    reference_attention,
    reference_attention_weights,
    reference_stats,
    visible_keys,
    weighted_values,
)
from attnjax.kernels.stats import AttentionStats

__all__ = [
    "IMPLEMENTATIONS",
    "MASK_VALUE",
    "AttentionStats",
    "BlockwiseBlockSizes",
    "PallasBlockSizes",
    "attention",
    "masked_softmax",
    "blockwise_attention",
    "pallas_attention",
    "reference_attention",
    "reference_attention_weights",
    "reference_stats",
    "resolve_impl",
    "visible_keys",
    "weighted_values",
]

IMPLEMENTATIONS = ("auto", "reference", "blockwise", "pallas")
_ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")
_MAX_BLOCK = 1024  # sequences are padded by less than this before positions are binned


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
# causal, statistics with a pooled map, and the backward kernels.
_PROBE_LENGTH = 256


@functools.lru_cache(maxsize=None)
def pallas_compiles(backend: str, dtype: str, head_dim: int) -> bool:
    """Whether every Pallas kernel (forward, statistics, backward) compiles here."""
    spec = jax.ShapeDtypeStruct((1, _PROBE_LENGTH, 1, head_dim), jnp.dtype(dtype))
    mask = jax.ShapeDtypeStruct((1, _PROBE_LENGTH), jnp.bool_)

    def forward_and_grad(q, k, v, mask):
        out, stats = pallas_attention(q, k, v, mask=mask, causal=True, stats=True, pool=4)
        loss = lambda q, k, v: jnp.sum(pallas_attention(q, k, v, mask=mask, causal=True).astype(jnp.float32))
        return out, stats, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    try:
        jax.jit(forward_and_grad).lower(spec, spec, spec, mask).compile()
        return True
    except Exception as error:  # Triton/Mosaic refusing a tile, shared memory, an old GPU, ...
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        warnings.warn(
            f"attnjax: the Pallas attention kernels do not compile on this {backend} for "
            f"{dtype}, head_dim {head_dim} ({type(error).__name__}: {first_line}); "
            "attention(impl='auto') uses the XLA blockwise kernels instead. Pass "
            "impl='pallas' to see the full error.",
            RuntimeWarning, stacklevel=3)
        return False


def _check_inputs(q, k, v, mask, scale, pool):
    """Validate the arguments of ``attention``; returns scale as a Python float or None."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"attention: {name} must be an array (batch, seq, heads, head_dim); got {type(x).__name__}.")
        if x.ndim != 4:
            raise ValueError(
                f"attention: {name} has shape {tuple(x.shape)}; expected 4 axes "
                "(batch, seq, heads, head_dim), as in jax.nn.dot_product_attention.")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(
                f"attention: {name} has dtype {x.dtype}; expected a floating dtype "
                "(float32, bfloat16, float16 or float64).")
    for name, x in (("k", k), ("v", v)):
        if tuple(x.shape) != tuple(q.shape):
            raise ValueError(
                f"attention: {name} has shape {tuple(x.shape)}; expected (batch, seq, heads, "
                f"head_dim) = {tuple(q.shape)}, the shape of q (self-attention).")
        if x.dtype != q.dtype:
            raise TypeError(f"attention: {name} has dtype {x.dtype} but q has {q.dtype}; cast them to one dtype.")
    batch, length = q.shape[0], q.shape[1]
    for axis, size in zip(("batch", "seq", "heads", "head_dim"), q.shape):
        if size < 1:
            raise ValueError(
                f"attention: q has shape {tuple(q.shape)}, an empty {axis} axis; every axis of "
                "(batch, seq, heads, head_dim) needs at least 1 element.")
    if mask is not None:
        if not hasattr(mask, "shape") or tuple(mask.shape) != (batch, length):
            got = tuple(mask.shape) if hasattr(mask, "shape") else type(mask).__name__
            raise ValueError(
                f"attention: mask has shape {got}; expected (batch, key_seq) = {(batch, length)}, "
                "True (or nonzero) at real tokens.")
        if not (jnp.issubdtype(mask.dtype, jnp.bool_) or jnp.issubdtype(mask.dtype, jnp.integer)):
            raise TypeError(f"attention: mask has dtype {mask.dtype}; expected bool (or integer 0/1).")
    if pool is not None and (isinstance(pool, bool) or not isinstance(pool, numbers.Integral) or pool < 1):
        raise ValueError(f"attention(pool={pool!r}): expected None or a positive int number of bins.")
    if pool is not None and (length + _MAX_BLOCK) * pool >= 2 ** 31:
        raise ValueError(
            f"attention(pool={pool}) at seq {length}: bins are computed as t * P // T in int32; "
            "use fewer bins.")
    if scale is None:
        return None
    try:
        return float(scale)
    except (TypeError, jax.errors.ConcretizationTypeError) as error:
        raise TypeError(
            "attention(scale=...) must be a Python number (it is a static argument of the "
            f"kernels); got {type(scale).__name__}.") from error


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: Optional[jax.Array] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    stats: bool = False,
    pool: Optional[int] = None,
    impl: Union[str, Callable] = "auto",
):
    """Softmax attention, optionally with streaming statistics.

    q, k, v: (batch, seq, heads, head_dim). mask: (batch, seq) bool key-padding mask,
    True at real tokens (a False key is invisible to every query; queries themselves
    are not masked). causal: key k visible to query i only if k <= i. scale defaults to
    1 / sqrt(head_dim). Scores are ``scale * q.k``.

    Returns the output (batch, seq, heads, head_dim) in q's dtype; with ``stats=True``,
    ``(output, AttentionStats)`` whose per-query arrays are (batch, heads, seq),
    ``received`` (batch, heads, seq) sums over non-padding queries only, and with
    ``pool=P`` ``pooled`` is (batch, heads, P, P). A query with no visible key gets a
    zero output row and all-zero statistics. Statistics are float32 (float64 for
    float64 inputs) and carry no gradient; the output is differentiable.

    ``impl``: "auto", "reference", "blockwise", "pallas" or a callable (see the
    module docstring). "pallas" on CPU runs the Pallas interpreter (slow).
    """
    scale = _check_inputs(q, k, v, mask, scale, pool)
    for flag, value in (("causal", causal), ("stats", stats)):
        if not isinstance(value, (bool, numbers.Integral)):
            raise TypeError(
                f"attention({flag}=...) must be a Python bool (it is a static argument of the "
                f"kernels); got {type(value).__name__}. Under jax.jit, mark it static.")
    if pool is not None and not stats:
        raise ValueError(f"attention(pool={pool}) needs stats=True: the pooled map is a statistic.")
    if callable(impl):
        if stats:
            raise ValueError(
                "attention(stats=True) with a custom attention function: custom attention "
                "functions cannot produce stats (AttentionStats are computed inside attnjax's "
                "own kernels). Use impl='auto', 'blockwise', 'pallas' or 'reference'.")
        return impl(q, k, v, mask=mask, causal=causal, scale=scale)
    name = resolve_impl(impl, q.dtype, q.shape[-1])
    kwargs = dict(mask=mask, causal=bool(causal), scale=scale, stats=bool(stats), pool=pool)
    if name == "reference":
        result = reference_attention(q, k, v, **kwargs)
        if not stats:
            return result
        out, statistics = result
        # Every implementation's statistics carry no gradient (the kernels' VJPs cover
        # the output only), so the choice of impl never changes a gradient.
        return out, jax.lax.stop_gradient(statistics)
    if name == "blockwise":
        return blockwise_attention(q, k, v, **kwargs)
    return pallas_attention(q, k, v, **kwargs)
