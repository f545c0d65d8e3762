"""next_token, duplicate and induction masses from recorded q, k and the streaming lse.

A stats-only Trace (Capture(stats=True)) has no T x T maps, and these three scores sum a
row's weights over keys picked by position or by token, which the per-query statistics
do not hold. With Capture(stats=True, qkv=True) they are recomputed here, tile by tile:
the weight query i gives key k is

    p_ik = exp(s_ik - lse_i),   s_ik = scale * q_i . k_k   (c tanh(s_ik / c) under a soft-cap),

over the keys i sees (non-padding, k <= i when causal, i - W < k under a window W), where
lse_i is the row's log-normaliser the kernel recorded (AttentionStats.lse). That is the
softmax the kernel computed, up to float32 rounding. Each (query block, key block) tile
needs no other tile (no online rescaling), so memory is O(T x QK_BLOCK) per head and the
T x T matrix is never built; a causal model skips the tiles above the diagonal, and a
windowed layer those left of its window.

Per-query quantities (the definitions of analysis.scores, from analysis._terms.
earlier_matches): next_token p_(i, i+1) (0 for causal models); duplicate the mass on
earlier keys k < i with query i's token; induction the mass on keys k whose previous
token k - 1 < i is a copy of query i's token (Olsson et al. 2022).
"""

from __future__ import annotations

import functools
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

QK_BLOCK = 512  # queries and keys per tile


def qk_match_terms(trace, windows: Tuple[Optional[int], ...]) -> Dict[str, jax.Array]:
    """(L, B, H, T) float32 next_token, duplicate and induction of a Trace that holds stats,
    queries and keys (module docstring). windows: each L entry's window (None: full)."""
    num_layers = trace.queries.shape[0]
    head_dim = trace.queries.shape[-1]
    scales = tuple(float(s) for s in trace.scales) if trace.scales else (head_dim ** -0.5,) * num_layers
    softcaps = tuple(trace.softcaps) if trace.softcaps else (None,) * num_layers
    return _qk_match_terms(trace.queries, trace.keys, trace.stats.lse, trace.mask, trace.input_ids,
                           causal=bool(trace.causal), windows=tuple(windows), scales=scales, softcaps=softcaps)


@functools.partial(jax.jit, static_argnames=("causal", "windows", "scales", "softcaps", "block"))
def _qk_match_terms(queries, keys, lse, mask, input_ids, *, causal: bool, windows, scales, softcaps,
                    block: int = QK_BLOCK) -> Dict[str, jax.Array]:
    per_layer = [
        _layer_terms(queries[l], keys[l], lse[l], mask, input_ids, causal=causal, window=windows[l],
                     scale=scales[l], softcap=softcaps[l], block=block)
        for l in range(queries.shape[0])
    ]
    return {name: jnp.stack([terms[name] for terms in per_layer]) for name in per_layer[0]}  # (L, B, H, T)


def _layer_terms(q, k, lse, mask, input_ids, *, causal: bool, window: Optional[int], scale: float,
                 softcap: Optional[float], block: int) -> Dict[str, jax.Array]:
    """One layer: q (B, H, T, D), k (B, Hkv, T, D), lse (B, H, T) -> (B, H, T) each."""
    batch, heads, seq, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    size = min(block, seq)
    padded = -(-seq // size) * size
    pad = padded - seq
    q = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, 0), (0, pad), (0, 0)))
    q = q.reshape(batch, kv_heads, group, padded, dim)                                  # (B, Hkv, G, Tp, D)
    k = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, 0), (0, pad), (0, 0)))             # (B, Hkv, Tp, D)
    lse = jnp.pad(lse.astype(jnp.float32), ((0, 0), (0, 0), (0, pad))).reshape(batch, kv_heads, group, padded)
    mask = jnp.pad(mask.astype(bool), ((0, 0), (0, pad)))                               # (B, Tp)
    ids = jnp.pad(input_ids.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=-1)  # (B, Tp)
    prev_ids = jnp.pad(ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)               # (B, Tp) token at k - 1
    prev_mask = jnp.pad(mask[:, :-1], ((0, 0), (1, 0)))                                 # (B, Tp)
    blocks = padded // size

    def weights(q_block, k_block, lse_block, q_pos, k_pos):
        """p (B, Hkv, G, bq, bk) of one tile, 0 where the key is not visible."""
        scores = jnp.einsum("BNGQD,BNKD->BNGQK", q_block, k_block,
                            precision=lax.Precision.HIGHEST) * scale                    # (B, Hkv, G, bq, bk)
        if softcap is not None:
            scores = softcap * jnp.tanh(scores / softcap)
        visible = jnp.take(mask, k_pos, axis=1)[:, None, :]                             # (B, 1, bk)
        if causal:
            visible = visible & (k_pos[None, :] <= q_pos[:, None])[None]                # (B, bq, bk)
        if window is not None:
            visible = visible & (k_pos[None, :] > q_pos[:, None] - window)[None]
        probs = jnp.exp(scores - lse_block[..., None])
        return jnp.where(visible[:, None, None], probs, 0.0)

    def query_block(index):
        start = index * size
        q_pos = start + jnp.arange(size)                                                # (bq,)
        q_block = lax.dynamic_slice_in_dim(q, start, size, axis=3)                      # (B, Hkv, G, bq, D)
        lse_block = lax.dynamic_slice_in_dim(lse, start, size, axis=3)                  # (B, Hkv, G, bq)
        q_ids = lax.dynamic_slice_in_dim(ids, start, size, axis=1)                      # (B, bq)
        q_mask = lax.dynamic_slice_in_dim(mask, start, size, axis=1)                    # (B, bq)

        def key_block(key_index, sums):
            k_start = key_index * size
            k_pos = k_start + jnp.arange(size)                                          # (bk,)
            k_block = lax.dynamic_slice_in_dim(k, k_start, size, axis=2)                # (B, Hkv, bk, D)
            probs = weights(q_block, k_block, lse_block, q_pos, k_pos)                  # (B, Hkv, G, bq, bk)
            k_ids = lax.dynamic_slice_in_dim(ids, k_start, size, axis=1)                # (B, bk)
            k_mask = lax.dynamic_slice_in_dim(mask, k_start, size, axis=1)
            before_ids = lax.dynamic_slice_in_dim(prev_ids, k_start, size, axis=1)
            before_mask = lax.dynamic_slice_in_dim(prev_mask, k_start, size, axis=1)
            both = q_mask[:, :, None] & k_mask[:, None, :]                              # (B, bq, bk)
            duplicate = (k_ids[:, None, :] == q_ids[:, :, None]) & (k_pos[None, :] < q_pos[:, None])[None] & both
            induction = ((before_ids[:, None, :] == q_ids[:, :, None]) & (k_pos[None, :] - 1 < q_pos[:, None])[None]
                         & before_mask[:, None, :] & both)                              # (B, bq, bk)
            add = [jnp.einsum("BNGQK,BQK->BNGQ", probs, selected.astype(jnp.float32),
                              precision=lax.Precision.HIGHEST) for selected in (duplicate, induction)]
            return sums[0] + add[0], sums[1] + add[1]

        first = 0 if window is None else jnp.maximum(0, (start - window + 1) // size)   # keys left of the window
        last = jnp.minimum(blocks, index + 1) if causal else blocks                     # keys above the diagonal
        zeros = jnp.zeros((batch, kv_heads, group, size), jnp.float32)
        return lax.fori_loop(first, last, key_block, (zeros, zeros))                    # (B, Hkv, G, bq) each

    duplicate, induction = lax.map(query_block, jnp.arange(blocks))                    # (nb, B, Hkv, G, bq) each

    def to_heads(per_block):  # (nb, B, Hkv, G, bq) -> (B, H, T)
        return jnp.moveaxis(per_block, 0, 3).reshape(batch, heads, padded)[..., :seq]

    if causal:
        next_token = jnp.zeros((batch, heads, seq), jnp.float32)  # a causal query never sees i + 1
    else:
        following = jnp.roll(k, -1, axis=2)                                             # (B, Hkv, Tp, D) k_(i+1)
        scores = jnp.einsum("BNGTD,BNTD->BNGT", q, following, precision=lax.Precision.HIGHEST) * scale
        if softcap is not None:
            scores = softcap * jnp.tanh(scores / softcap)
        seen = jnp.roll(mask, -1, axis=1) & (jnp.arange(padded) + 1 < padded)[None]   # (B, Tp) i + 1 is a token
        next_token = jnp.where(seen[:, None, None], jnp.exp(scores - lse), 0.0)        # (B, Hkv, G, Tp)
        next_token = next_token.reshape(batch, heads, padded)[..., :seq]
    return {"next_token": next_token, "duplicate": to_heads(duplicate), "induction": to_heads(induction)}
