"""The front door's checks, and the normalised call every implementation receives.

``normalize`` is the only place the arguments of ``attnjax.kernels.attention`` are
validated. It returns the key mask (bool or None) and an ``AttentionSpec``: a frozen,
hashable description of the call (static under jax.jit, usable as a custom_vjp
nondiff argument). Each implementation (reference, blockwise, Pallas) then takes
``(q, k, v, mask, spec)`` and implements only its core.

Semantics every implementation shares (q: (B, T, Hq, D); k, v: (B, T, Hkv, D)):

- scores ``s_ij = scale * q_i . k_j`` (scale defaults to 1 / sqrt(D));
- ``softcap=c``: ``s <- c * tanh(s / c)`` before masking (Gemma 2's
  attn_logit_softcapping); the statistics and ``Trace.scores`` see the capped scores;
- key j is visible to query i when ``mask[b, j]`` is True, and, under ``causal``,
  ``j <= i``, and, with ``window=W``, ``i - W < j`` (Hugging Face's
  sliding_window_overlay: W keys including the query itself). A window needs
  ``causal=True``;
- grouped-query attention: Hkv divides Hq; query head h reads kv head
  ``h // (Hq // Hkv)`` (transformers' repeat_kv, a repeat, not a tile). Multi-query
  attention is Hkv = 1. Implementations never materialise the repeated K/V.
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

# Sequences are padded by less than this before positions are binned (pooled maps).
MAX_BLOCK = 1024


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """A validated attention call, minus the arrays.

    scale:   the score scale (a Python float).
    causal:  key j visible to query i only if j <= i.
    window:  None, or W >= 1: key j visible to query i only if i - W < j (needs causal).
    softcap: None, or c > 0: scores become c * tanh(s / c) before masking.
    groups:  query heads per kv head, Hq // Hkv (1 for multi-head attention).
    stats:   also return AttentionStats.
    pool:    with stats, the number of bins of the pooled map (None: no map).
    """

    scale: float
    causal: bool = False
    window: Optional[int] = None
    softcap: Optional[float] = None
    groups: int = 1
    stats: bool = False
    pool: Optional[int] = None


def cap_scores(scores: jax.Array, softcap: Optional[float]) -> jax.Array:
    """Gemma 2's soft-capping ``c * tanh(s / c)``; the scores unchanged without a cap."""
    if softcap is None:
        return scores
    return softcap * jnp.tanh(scores / softcap)


def softcap_grad(capped: jax.Array, softcap: Optional[float]) -> Optional[jax.Array]:
    """d capped / d s from the capped scores: ``1 - (capped / c)^2``; None without a cap."""
    if softcap is None:
        return None
    return 1.0 - jnp.square(capped / softcap)


def positions_visible(query_pos, key_pos, causal: bool, window: Optional[int]):
    """Whether key position ``key_pos`` is visible from ``query_pos`` by position alone
    (causality and the sliding window; the key mask is separate). The arguments
    broadcast against each other (e.g. (Tq, 1) and (1, Tk)). Returns None when no
    positional rule applies (every position visible)."""
    visible = None
    if causal:
        visible = key_pos <= query_pos
    if window is not None:
        inside = key_pos > query_pos - window
        visible = inside if visible is None else visible & inside
    return visible


def _block_of(position, block: int):
    """``position // block`` for a non-negative position (a Python or a traced int).
    Traced positions use lax.div (truncation, equal to floor here): ``//`` adds sign
    fix-ups that Mosaic does not lower for program ids off a TPU (Pallas kernels call
    these ranges)."""
    if isinstance(position, numbers.Integral):
        return position // block
    position = jnp.asarray(position)
    return lax.div(position, jnp.asarray(block, position.dtype))


def key_block_range(first_query, last_query, block_k: int, num_key_blocks, causal: bool,
                    window: Optional[int]):
    """[lower, upper) key blocks that can hold a key visible to queries
    first_query..last_query (traced ints fine). Blocks entirely above the diagonal
    or entirely before every query's window are skipped."""
    lower = 0
    upper = num_key_blocks
    if causal:
        upper = jnp.minimum(_block_of(last_query, block_k) + 1, num_key_blocks)
    if window is not None:
        lower = _block_of(jnp.maximum(first_query - window + 1, 0), block_k)
    return lower, upper


def query_block_range(first_key, last_key, block_q: int, num_query_blocks, causal: bool,
                      window: Optional[int]):
    """[lower, upper) query blocks that can see a key among first_key..last_key."""
    lower = 0
    upper = num_query_blocks
    if causal:
        lower = _block_of(first_key, block_q)
    if window is not None:
        upper = jnp.minimum(_block_of(last_key + window - 1, block_q) + 1, num_query_blocks)
    return lower, upper


def _check_array(name: str, x) -> None:
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


def _static_flag(name: str, value) -> bool:
    if not isinstance(value, (bool, numbers.Integral)):
        raise TypeError(
            f"attention({name}=...) must be a Python bool (it is a static argument of the "
            f"kernels); got {type(value).__name__}. Under jax.jit, mark it static.")
    return bool(value)


def _static_number(name: str, value, kind):
    if isinstance(value, (str, bytes)):  # float("30") would parse: a string is a mistake here
        raise TypeError(
            f"attention({name}=...) must be a Python number (it is a static argument of the "
            f"kernels); got {type(value).__name__}.")
    try:
        return kind(value)
    except (TypeError, jax.errors.ConcretizationTypeError) as error:
        raise TypeError(
            f"attention({name}=...) must be a Python number (it is a static argument of the "
            f"kernels); got {type(value).__name__}.") from error


def normalize(q, k, v, *, mask=None, causal=False, scale=None, window=None, softcap=None,
              stats=False, pool=None):
    """Validate an attention call; return ``(mask, spec)``.

    ``mask`` comes back as a (B, T) bool array or None; ``spec`` is the AttentionSpec.
    Every error names the argument, what was expected and what to do.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_array(name, x)
    batch, length, heads, head_dim = q.shape
    for axis, size in zip(("batch", "seq", "heads", "head_dim"), q.shape):
        if size < 1:
            raise ValueError(
                f"attention: q has shape {tuple(q.shape)}, an empty {axis} axis; every axis of "
                "(batch, seq, heads, head_dim) needs at least 1 element.")
    kv_heads = k.shape[2]
    for name, x in (("k", k), ("v", v)):
        expected = (batch, length, kv_heads, head_dim)
        if tuple(x.shape) != expected or x.shape[2] < 1:
            raise ValueError(
                f"attention: {name} has shape {tuple(x.shape)}; expected (batch, seq, kv_heads, "
                f"head_dim) = {expected} to go with q {tuple(q.shape)} (self-attention; k and v "
                "share one shape, and kv_heads may be fewer than q's heads).")
        if x.dtype != q.dtype:
            raise TypeError(f"attention: {name} has dtype {x.dtype} but q has {q.dtype}; cast them to one dtype.")
    if heads % kv_heads:
        raise ValueError(
            f"attention: q has {heads} heads and k/v have {kv_heads}; grouped-query attention "
            f"needs the query heads to be a multiple of the kv heads ({heads} % {kv_heads} != 0).")
    if mask is not None:
        if not hasattr(mask, "shape") or tuple(mask.shape) != (batch, length):
            got = tuple(mask.shape) if hasattr(mask, "shape") else type(mask).__name__
            raise ValueError(
                f"attention: mask has shape {got}; expected (batch, key_seq) = {(batch, length)}, "
                "True (or nonzero) at real tokens.")
        if not (jnp.issubdtype(mask.dtype, jnp.bool_) or jnp.issubdtype(mask.dtype, jnp.integer)):
            raise TypeError(f"attention: mask has dtype {mask.dtype}; expected bool (or integer 0/1).")
        mask = mask.astype(bool)
    causal = _static_flag("causal", causal)
    stats = _static_flag("stats", stats)
    if pool is not None:
        if isinstance(pool, bool) or not isinstance(pool, numbers.Integral) or pool < 1:
            raise ValueError(f"attention(pool={pool!r}): expected None or a positive int number of bins.")
        if not stats:
            raise ValueError(f"attention(pool={pool}) needs stats=True: the pooled map is a statistic.")
        if (length + MAX_BLOCK) * pool >= 2 ** 31:
            raise ValueError(
                f"attention(pool={pool}) at seq {length}: bins are computed as t * P // T in int32; "
                "use fewer bins.")
        pool = int(pool)
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
            raise ValueError(
                f"attention(window={window!r}): expected None or a positive int, the number of "
                "keys a query sees (itself included).")
        if not causal:
            raise ValueError(
                f"attention(window={window}) needs causal=True: a sliding window is the W most "
                "recent keys, i - W < j <= i (Hugging Face's rule).")
        window = int(window)
    if softcap is not None:
        softcap = _static_number("softcap", softcap, float)
        if not softcap > 0:
            raise ValueError(f"attention(softcap={softcap}): expected a positive cap, or None for no cap.")
    if scale is None:
        scale = 1.0 / float(head_dim) ** 0.5
    else:
        scale = _static_number("scale", scale, float)
    spec = AttentionSpec(scale=scale, causal=causal, window=window, softcap=softcap,
                         groups=heads // kv_heads, stats=stats, pool=pool)
    return mask, spec


def keyword_entry(core: Callable, *, name: str, doc: str) -> Callable:
    """The public keyword form of an implementation's core, written once for all of them.

    Returns ``entry(q, k, v, *, mask=None, causal=False, scale=None, window=None,
    softcap=None, stats=False, pool=None, **options)``, which validates through
    ``normalize`` and returns ``core(q, k, v, mask, spec, **options)``; ``options`` are
    the core's own keyword-only arguments (block_sizes, backend, impl), which the
    entry's signature (help(), IDEs) lists after the shared ones.
    """

    def entry(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Optional[jax.Array] = None,
              causal: bool = False, scale: Optional[float] = None, window: Optional[int] = None,
              softcap: Optional[float] = None, stats: bool = False, pool: Optional[int] = None,
              **options):
        mask, spec = normalize(q, k, v, mask=mask, causal=causal, scale=scale, window=window,
                               softcap=softcap, stats=stats, pool=pool)
        return core(q, k, v, mask, spec, **options)

    shared = [p for p in inspect.signature(entry).parameters.values() if p.kind is not p.VAR_KEYWORD]
    own = [p for p in inspect.signature(core).parameters.values() if p.kind is p.KEYWORD_ONLY]
    entry.__signature__ = inspect.Signature(shared + own)
    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = core.__module__
    entry.__doc__ = doc
    return entry
