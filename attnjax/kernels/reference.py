"""Plain jnp softmax attention and its statistics: the truth every other kernel is tested against.

Everything here builds the full (Tq, Tk) score matrix, so it is for small sizes only.
Semantics (shared by every implementation in attnjax.kernels; ``attnjax.kernels.spec``
validates them):

- q is (batch, seq, heads, head_dim) and k, v are (batch, seq, kv_heads, head_dim), as
  in ``jax.nn.dot_product_attention``. Grouped-query attention: kv_heads divides heads
  and query head h reads kv head ``h // (heads // kv_heads)`` (transformers'
  repeat_kv); the repeated K/V are never built: the G query heads of one kv head are
  stacked along the query axis of one matmul;
- scores ``s_ik = scale * q_i . k_k`` with ``scale = 1 / sqrt(head_dim)`` by default;
- ``softcap=c``: ``s <- c * tanh(s / c)`` before masking (Gemma 2); the statistics
  and the recorded scores are the capped ones;
- ``mask`` (batch, seq) marks real tokens (True / nonzero). A key whose mask is False
  is invisible to every query. Queries are never masked: a padding query still
  attends to the visible keys (its row is a normal softmax row);
- ``causal``: key k is visible to query i only if k <= i (on top of the key mask);
- ``window=W`` (with causal): key k is visible to query i only if i - W < k <= i,
  the W most recent keys, the query itself included (Hugging Face's sliding window);
- invisible scores hold the large finite ``MASK_VALUE`` (not -inf, which makes NaN
  in -inf - -inf and 0 * -inf); their probabilities are exactly 0;
- a query with no visible key (a fully masked row) gets a zero output row, zero
  probabilities and every statistic 0 (argmax 0), never NaN.

Arithmetic runs in float32 (float64 for float64 inputs) with full-precision matmuls;
the output is cast back to the input dtype. The statistics are the ones documented in
``attnjax.kernels.stats.AttentionStats`` (per query head); see ``reference_stats`` for
how each is read off the full matrix.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from attnjax.kernels.spec import AttentionSpec, cap_scores, keyword_entry, positions_visible
from attnjax.kernels.stats import AttentionStats

# Large finite negative logit for invisible keys (about -0.7 * float32 max, as in
# JAX's own Pallas attention ops): finite, so masked arithmetic never makes NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def accumulation_dtype(dtype) -> jnp.dtype:
    """float32 for half and single precision inputs, float64 for float64 inputs."""
    return jnp.promote_types(dtype, jnp.float32)


def matmul_precision(dtype):
    """Full-precision matmuls for float32/float64 inputs (no TF32 on GPU); default for bf16/f16."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype).itemsize >= 4 else lax.Precision.DEFAULT


def default_scale(head_dim: int) -> float:
    """1 / sqrt(head_dim), the Transformer convention."""
    return 1.0 / math.sqrt(head_dim)


def visible_keys(mask: Optional[jax.Array], batch: int, num_queries: int, num_keys: int,
                 causal: bool, window: Optional[int] = None) -> jax.Array:
    """(B, 1, Tq, Tk) bool: whether query i may attend to key k.

    ``mask`` (B, Tk) bool or None (every key visible); ``causal`` adds k <= i and
    ``window=W`` adds i - W < k (``spec.positions_visible``).
    """
    if mask is None:
        mask = jnp.ones((batch, num_keys), dtype=bool)  # (B, Tk)
    visible = mask.astype(bool)[:, None, None, :]  # (B, 1, 1, Tk)
    query_pos = jnp.arange(num_queries)[:, None]  # (Tq, 1)
    key_pos = jnp.arange(num_keys)[None, :]  # (1, Tk)
    positional = positions_visible(query_pos, key_pos, causal, window)  # (Tq, Tk) or None
    if positional is not None:
        visible = visible & positional[None, None]  # (B, 1, Tq, Tk)
    return jnp.broadcast_to(visible, (batch, 1, num_queries, num_keys))  # (B, 1, Tq, Tk)


def query_groups(q_heads_count: int, kv_heads_count: int) -> int:
    """Query heads per kv head, G = Hq // Hkv; a clear error when Hkv does not divide Hq."""
    if kv_heads_count < 1 or q_heads_count % kv_heads_count:
        raise ValueError(
            f"attention: q has {q_heads_count} heads and k/v have {kv_heads_count}; grouped-query "
            f"attention needs the query heads to be a multiple of the kv heads.")
    return q_heads_count // kv_heads_count


def reference_attention_weights(
    q: jax.Array,
    k: jax.Array,
    mask: Optional[jax.Array] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    *,
    window: Optional[int] = None,
    softcap: Optional[float] = None,
) -> Tuple[jax.Array, jax.Array]:
    """Scores and softmax probabilities of plain attention, the full matrices.

    q: (B, Tq, Hq, H); k: (B, Tk, Hkv, H) with Hkv dividing Hq (query head h reads kv
    head h // (Hq // Hkv)). mask: (B, Tk) bool (True at real tokens) or None.
    Returns ``(scores, probs)``, each (B, Hq, Tq, Tk), per query head, in float32
    (float64 for float64 inputs). ``scores`` is ``scale * q.k`` (soft-capped with
    ``softcap``) at visible keys and ``MASK_VALUE`` elsewhere; ``probs`` is the softmax
    over keys, exactly 0 at invisible keys, and a row with no visible key is all zeros.
    ``window`` and ``softcap`` as in the module docstring (a window assumes causal).
    """
    acc = accumulation_dtype(q.dtype)
    batch, num_queries, _, head_dim = q.shape
    num_keys = k.shape[1]
    scale = default_scale(head_dim) if scale is None else float(scale)
    visible = visible_keys(mask, batch, num_queries, num_keys, causal, window)  # (B, 1, Tq, Tk)
    scores = grouped_scores(q, k, scale, softcap, acc)  # (B, Hq, Tq, Tk)
    scores = jnp.where(visible, scores, MASK_VALUE)  # (B, Hq, Tq, Tk)
    return scores, masked_softmax(scores, visible)


def grouped_scores(q: jax.Array, k: jax.Array, scale: float, softcap: Optional[float], acc) -> jax.Array:
    """``scale * q.k`` per query head, soft-capped, at every key (no mask): (B, Hq, Tq, Tk) in ``acc``.

    q: (B, Tq, Hq, H); k: (B, Tk, Hkv, H). Heads-major operands make the contraction a
    plain batched matmul (several times faster on XLA:CPU than the (B, T, N, H) einsum).
    Under GQA the G query heads of a kv head are stacked along the query axis, so K is
    never repeated.
    """
    batch, num_queries, heads, head_dim = q.shape
    num_keys, kv_heads = k.shape[1], k.shape[2]
    groups = query_groups(heads, kv_heads)
    q_heads = jnp.swapaxes(q.astype(acc), 1, 2)  # (B, Hq, Tq, H)
    q_heads = q_heads.reshape(batch, kv_heads, groups * num_queries, head_dim)  # (B, Hkv, G Tq, H)
    k_heads = jnp.swapaxes(k.astype(acc), 1, 2)  # (B, Hkv, Tk, H)
    scores = jnp.matmul(q_heads, jnp.swapaxes(k_heads, -1, -2),
                        precision=lax.Precision.HIGHEST) * scale  # (B, Hkv, G Tq, Tk)
    scores = scores.reshape(batch, heads, num_queries, num_keys)  # (B, Hq, Tq, Tk)
    return cap_scores(scores, softcap)  # (B, Hq, Tq, Tk)


def masked_softmax(scores: jax.Array, visible: jax.Array) -> jax.Array:
    """Softmax over the last axis, exactly 0 at invisible keys; an all-invisible row is 0.

    scores: (..., Tq, Tk); visible: bool, broadcastable to scores.
    """
    row_max = lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))  # (..., Tq, 1)
    weights = jnp.where(visible, jnp.exp(scores - row_max), 0.0)  # (..., Tq, Tk)
    total = jnp.sum(weights, axis=-1, keepdims=True)  # (..., Tq, 1)
    return weights / jnp.where(total > 0, total, 1.0)  # (..., Tq, Tk)


def weighted_values(probs: jax.Array, v: jax.Array) -> jax.Array:
    """probs (B, Hq, Tq, Tk) times v (B, Tk, Hkv, H) -> (B, Tq, Hq, H), in probs' dtype.

    Query head h reads kv head h // (Hq // Hkv); the G probability rows of one kv head
    are stacked into one matmul (V is never repeated).
    """
    batch, heads, num_queries, num_keys = probs.shape
    kv_heads, head_dim = v.shape[2], v.shape[3]
    groups = query_groups(heads, kv_heads)
    v_heads = jnp.swapaxes(v.astype(probs.dtype), 1, 2)  # (B, Hkv, Tk, H)
    stacked = probs.reshape(batch, kv_heads, groups * num_queries, num_keys)  # (B, Hkv, G Tq, Tk)
    out = jnp.matmul(stacked, v_heads, precision=lax.Precision.HIGHEST)  # (B, Hkv, G Tq, H)
    out = out.reshape(batch, heads, num_queries, head_dim)  # (B, Hq, Tq, H)
    return jnp.swapaxes(out, 1, 2)  # (B, Tq, Hq, H)


def pool_bins(length: int, pool: int) -> jax.Array:
    """(length,) int32: the pooled-map bin of each position, floor(t * P / T)."""
    return (jnp.arange(length, dtype=jnp.int32) * pool) // length  # (T,)


def reference_stats(
    scores: jax.Array,
    probs: jax.Array,
    mask: Optional[jax.Array] = None,
    pool: Optional[int] = None,
) -> AttentionStats:
    """AttentionStats read off full (B, N, Tq, Tk) scores and probs (as returned above).

    Definitions, per query row i with p = probs[..., i, :]:
    lse = logsumexp of the visible scores; entropy = -sum p log p (nats);
    max_prob = max p; argmax = argmax of the scores (= of p; first maximum on ties);
    first_mass = p_i0; self_mass = p_ii; prev_mass = p_i,i-1 (0 for i = 0);
    mean_distance = sum_k p_ik |i - k|. A row with no visible key has all of them 0.
    received[k] = sum_i p_ik over queries i whose mask is True (all queries when
    ``mask`` is None). pooled (with ``pool=P``): position t falls in bin
    floor(t * P / T); cell (a, b) is the mean of p over every (query, key) pair with
    query in bin a and key in bin b (all queries, padding included), 0 for an empty bin.
    """
    batch, _, num_queries, num_keys = probs.shape
    acc = probs.dtype
    row_valid = jnp.any(probs > 0, axis=-1)  # (B, N, Tq)
    lse = jax.nn.logsumexp(scores, axis=-1)  # (B, N, Tq)
    lse = jnp.where(row_valid, lse, 0.0)  # (B, N, Tq)
    plogp = jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0)  # (B, N, Tq, Tk)
    entropy = -jnp.sum(plogp, axis=-1)  # (B, N, Tq)
    max_prob = jnp.max(probs, axis=-1)  # (B, N, Tq)
    argmax = jnp.where(row_valid, jnp.argmax(scores, axis=-1), 0).astype(jnp.int32)  # (B, N, Tq)
    first_mass = probs[..., 0]  # (B, N, Tq)
    self_mass = jnp.diagonal(probs, axis1=-2, axis2=-1)  # (B, N, min(Tq, Tk))
    prev_mass = jnp.diagonal(probs, offset=-1, axis1=-2, axis2=-1)  # (B, N, Tq - 1)
    prev_mass = jnp.pad(prev_mass, ((0, 0), (0, 0), (1, 0)))  # (B, N, Tq)
    query_pos = jnp.arange(num_queries, dtype=acc)[:, None]  # (Tq, 1)
    key_pos = jnp.arange(num_keys, dtype=acc)[None, :]  # (1, Tk)
    distance = jnp.abs(query_pos - key_pos)  # (Tq, Tk)
    mean_distance = jnp.sum(probs * distance[None, None], axis=-1)  # (B, N, Tq)
    if mask is None:
        query_weight = jnp.ones((batch, num_queries), dtype=acc)  # (B, Tq)
    else:
        query_weight = mask.astype(acc)  # (B, Tq)
    received = jnp.einsum("BNTS,BT->BNS", probs, query_weight,
                          precision=lax.Precision.HIGHEST)  # (B, N, Tk)
    pooled = None
    if pool is not None:
        query_bins = jax.nn.one_hot(pool_bins(num_queries, pool), pool, dtype=acc)  # (Tq, P)
        key_bins = jax.nn.one_hot(pool_bins(num_keys, pool), pool, dtype=acc)  # (Tk, P)
        sums = jnp.einsum("BNTS,TA,SC->BNAC", probs, query_bins, key_bins,
                          precision=lax.Precision.HIGHEST)  # (B, N, P, P)
        cells = jnp.sum(query_bins, axis=0)[:, None] * jnp.sum(key_bins, axis=0)[None, :]  # (P, P)
        cells = cells[None, None]  # (1, 1, P, P)
        pooled = jnp.where(cells > 0, sums / jnp.maximum(cells, 1.0), 0.0)  # (B, N, P, P)
    return AttentionStats(
        lse=lse, entropy=entropy, max_prob=max_prob, argmax=argmax,
        first_mass=first_mass, self_mass=self_mass, prev_mass=prev_mass,
        mean_distance=mean_distance, received=received, pooled=pooled,
    )


@functools.partial(jax.jit, static_argnames=("spec",))
def reference_core(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array],
                   spec: AttentionSpec):
    """The reference implementation of a validated call (``spec.normalize``); jitted,
    since run op by op its dozens of small primitives each compile on first use.

    Returns out (B, T, Hq, H) in q's dtype, or with ``spec.stats`` ``(out,
    AttentionStats)`` read off the full matrix (differentiable; the front door stops
    their gradient as the kernels do).
    """
    scores, probs = reference_attention_weights(
        q, k, mask, spec.causal, spec.scale, window=spec.window, softcap=spec.softcap)  # (B, Hq, T, T) x2
    out = weighted_values(probs, v).astype(q.dtype)  # (B, T, Hq, H)
    if not spec.stats:
        return out
    return out, reference_stats(scores, probs, mask, spec.pool)


reference_attention = keyword_entry(reference_core, name="reference_attention", doc="""\
Dense softmax attention. q: (B, T, Hq, H), k, v: (B, T, Hkv, H); returns out
(B, T, Hq, H) in q's dtype.

With ``stats=True`` returns ``(out, AttentionStats)`` computed from the full matrix
by ``reference_stats``. Differentiable with jax.grad (the statistics too).
Arguments are checked by ``spec.normalize``, as for ``attnjax.kernels.attention``.
""")
