"""Key/value caches for the decoders: fixed-size buffers and attention over them.

A cache holds, per layer, the keys and values of every position written so far in
buffers of a fixed size S (the longest sequence a generation may reach), so one
compiled prefill and one compiled decode step serve a whole generation:

- the prefill writes the prompt's keys and values at positions 0..T-1;
- each decode step writes one position and attends over the buffer.

Which keys a query sees is decided by position alone: query position i sees cached
position j when j <= i (causal) and, with a sliding window W, i - W < j (Mistral,
Gemma 2, Qwen's windowed layers), exactly the masks transformers builds when it
generates. Slots beyond the current position are never visible, so whatever they
hold (zeros, or a padded prompt's keys that later steps overwrite) never matters.

A decode step's attention over the cache is the dense reference computation
(``kernels.reference``): scores scale * q.k, soft-capped, MASK_VALUE at invisible
keys, softmax in float32, probabilities exactly 0 where invisible. That is one (1, S)
row per head, so the rows and their statistics cost O(S) per step. The prefill sees
only its own keys, so it runs the model's usual attention (models.attention.attend:
the streaming kernel, O(T) memory for statistics) and ``widen_records`` lays its
records over the S slots.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from attnjax.kernels.reference import MASK_VALUE, grouped_scores, masked_softmax, weighted_values
from attnjax.kernels.spec import positions_visible
from attnjax.kernels.stats import AttentionStats
from attnjax.trace import Capture

RECORD = "kv_cache"  # the key under which a layer hands its updated cache up to the model
LayerCache = Tuple[jax.Array, jax.Array]  # keys, values: (B, S, Hkv, H) each


def empty_cache(num_layers: int, batch: int, size: int, kv_heads: int, head_dim: int, dtype) -> Tuple[LayerCache, ...]:
    """Zeroed keys and values (B, S, Hkv, H) for every layer."""
    shape = (batch, size, kv_heads, head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(num_layers))


def write(cache: LayerCache, k: jax.Array, v: jax.Array, offset) -> LayerCache:
    """The cache with k, v (B, T, Hkv, H) written at positions offset..offset+T-1."""
    keys, values = cache
    start = (0, offset, 0, 0)
    return (lax.dynamic_update_slice(keys, k.astype(keys.dtype), start),
            lax.dynamic_update_slice(values, v.astype(values.dtype), start))


def widen_records(records: Dict[str, jax.Array], size: int) -> Dict[str, jax.Array]:
    """A prefill's records over its own T keys laid over all ``size`` cache slots, as a
    decode step's are: attention (B, H, T, T) padded with 0 and scores with MASK_VALUE
    to (B, H, T, S), the statistics' ``received`` (B, H, T) with 0 to (B, H, S); slots
    past the prompt are invisible to it. q/k/v records are dropped (steps make none)."""
    def keys_to(array, value):
        return jnp.pad(array, [(0, 0)] * (array.ndim - 1) + [(0, size - array.shape[-1])], constant_values=value)

    widened = {name: value for name, value in records.items() if name not in ("queries", "keys", "values")}
    if "attention" in widened:
        widened["attention"] = keys_to(widened["attention"], 0.0)  # (B, H, T, S)
    if "scores" in widened:
        widened["scores"] = keys_to(widened["scores"], MASK_VALUE)  # (B, H, T, S)
    if "stats" in widened:
        stats = widened["stats"]
        widened["stats"] = dataclasses.replace(stats, received=keys_to(stats.received, 0.0))  # (B, H, S)
    return widened


def step_stats(scores: jax.Array, probs: jax.Array, query_pos: jax.Array, query_mask: jax.Array) -> AttentionStats:
    """AttentionStats of rows whose queries sit at ``query_pos`` (Tq,) over keys 0..S-1.

    Same definitions as kernels.reference_stats (see AttentionStats), with each row's
    own position in place of its row index: self_mass = p[i, i], prev_mass = p[i, i-1],
    mean_distance = sum_k p_ik |i - k| for query position i. ``received`` sums the rows
    whose ``query_mask`` (B, Tq) is True (a padded prompt's real queries); a generation
    adds up its steps' sums.
    """
    num_keys = probs.shape[-1]
    row_valid = jnp.any(probs > 0, axis=-1)  # (B, N, Tq)
    lse = jnp.where(row_valid, jax.nn.logsumexp(scores, axis=-1), 0.0)  # (B, N, Tq)
    plogp = jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0)  # (B, N, Tq, S)
    key_pos = jnp.arange(num_keys)  # (S,)

    def at(shift):  # p[i, i + shift] for each query position i (0 where that key does not exist)
        hit = key_pos[None, :] == (query_pos + shift)[:, None]  # (Tq, S)
        return jnp.sum(jnp.where(hit[None, None], probs, 0.0), axis=-1)  # (B, N, Tq)

    distance = jnp.abs(query_pos[:, None] - key_pos[None, :]).astype(probs.dtype)  # (Tq, S)
    return AttentionStats(
        lse=lse,
        entropy=-jnp.sum(plogp, axis=-1),
        max_prob=jnp.max(probs, axis=-1),
        argmax=jnp.where(row_valid, jnp.argmax(scores, axis=-1), 0).astype(jnp.int32),
        first_mass=probs[..., 0],
        self_mass=at(0),
        prev_mass=at(-1),
        mean_distance=jnp.sum(probs * distance[None, None], axis=-1),
        received=jnp.einsum("BNTS,BT->BNS", probs, query_mask.astype(probs.dtype),
                            precision=lax.Precision.HIGHEST),  # (B, N, S)
    )


def attend_cached(
    q: jax.Array,
    cache: LayerCache,
    offset,
    query_mask: jax.Array,
    *,
    scale: float,
    capture: Capture,
    record: bool,
    window: Optional[int] = None,
    softcap: Optional[float] = None,
) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """Queries at positions offset..offset+Tq-1 attending over the cached keys.

    q: (B, Tq, Hq, H); cache: keys and values (B, S, Hkv, H), this layer's own keys
    already written (``write``); query_mask (B, Tq) bool: which queries are real (only
    ``received`` reads it: a padded prompt's extra queries see only real keys, by
    position). Query head h reads kv head h // (Hq // Hkv). Returns
    out (B, Tq, Hq, H) in the values' dtype and the records ``attend`` would make
    (attention / scores (B, Hq, Tq, S), stats), over all S cache slots.
    """
    keys, values = cache
    acc = jnp.promote_types(q.dtype, jnp.float32)
    num_queries = q.shape[1]
    num_keys = keys.shape[1]
    query_pos = offset + jnp.arange(num_queries)  # (Tq,)
    visible = positions_visible(query_pos[:, None], jnp.arange(num_keys)[None, :], True, window)  # (Tq, S)
    scores = grouped_scores(q, keys, scale, softcap, acc)  # (B, Hq, Tq, S)
    scores = jnp.where(visible[None, None], scores, MASK_VALUE)  # (B, Hq, Tq, S)
    probs = masked_softmax(scores, visible[None, None])  # (B, Hq, Tq, S)
    out = weighted_values(probs, values).astype(values.dtype)  # (B, Tq, Hq, H)
    records: Dict[str, jax.Array] = {}
    if record and capture.attention:
        records["attention"] = probs
    if record and capture.scores:
        records["scores"] = scores
    if record and capture.stats:
        records["stats"] = step_stats(scores, probs, query_pos, query_mask)
    return out, records
