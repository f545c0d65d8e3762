"""The blockwise column pass: ``received`` and the pooled map's sums.

Both need the finished LSE, so this second pass walks key blocks (``lax.scan``) and,
inside each, the query blocks that can see one of its keys (``lax.fori_loop`` over
``spec.query_block_range``: under causal from the diagonal down, with a window of W
only the blocks within W - 1 queries after it), recomputing ``p = exp(s - lse)``
tile by tile (soft-capped scores, as in the forward). Under GQA the G query heads
of a kv head share its key block. The pooled map is reduced to its P x P sums inside
the step, so no (P, T) array outlives a step.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from attnjax.kernels.blockwise_common import (
    Config,
    group_key_visible,
    group_origin,
    num_steps,
    stack_rows,
    take_keys,
    take_queries,
    take_rows,
)
from attnjax.kernels.reference import MASK_VALUE, accumulation_dtype, matmul_precision
from attnjax.kernels.spec import cap_scores, positions_visible, query_block_range


def column_group(q, k, key_vis, query_weight, lse, cfg: Config):
    """Column sums of p = exp(s - lse) for one step, recomputed tile by tile.

    q: (c, G, Tp, H); k: (c, Tp, H); key_vis: (c, Tp) bool; query_weight: (Tp,) (1
    at queries counted in ``received``); lse: (c, G, Tp). Returns received (c, G, Tp)
    and, with ``spec.pool``, the pooled sums (c, G, P, P): cell (a, b) sums p_ik over
    queries i in bin a and keys k in bin b (else a placeholder (c, G)).

    A query block of bq rows meets at most ``local_bins = (bq - 1) P // T + 2`` bins
    (bins are contiguous runs of T / P positions), so each tile is reduced with a
    (bq, local_bins) one-hot matmul and added at the block's first bin, instead of a
    (bq, P) one: at T = 16k, P = 64, bq = 512 that is 3 bins instead of 64.
    """
    c, groups, padded, head_dim = q.shape
    spec = cfg.spec
    pool: Optional[int] = spec.pool
    acc = accumulation_dtype(q.dtype)
    precision = matmul_precision(q.dtype)
    stats_precision = lax.Precision.HIGHEST  # sums of float32 p: no TF32 or bf16 passes
    bq, bk, length = cfg.block_q, cfg.block_k, cfg.length
    local_bins = 0 if pool is None else min(pool, (bq - 1) * pool // length + 2)

    def key_block(pooled, jk):
        k_blk = lax.dynamic_slice_in_dim(k, jk * bk, bk, axis=1).astype(acc)  # (c, bk, H)
        key_blk = lax.dynamic_slice_in_dim(key_vis, jk * bk, bk, axis=1)  # (c, bk)
        key_pos = jk * bk + jnp.arange(bk, dtype=jnp.int32)  # (bk,)

        def step(i, carry):
            received, bin_sums = carry
            q_blk = lax.dynamic_slice_in_dim(q, i * bq, bq, axis=2).astype(acc)  # (c, G, bq, H)
            lse_blk = lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=2)  # (c, G, bq)
            weight_blk = lax.dynamic_slice_in_dim(query_weight, i * bq, bq, axis=0)  # (bq,)
            query_pos = i * bq + jnp.arange(bq, dtype=jnp.int32)  # (bq,)
            # Key-major tiles (c, bk, G, bq), the matmul's own output order: the sums
            # over queries then run along the minor axis (a query-major p, or a
            # transposed one, costs a copy of every tile on XLA:CPU).
            visible = key_blk[:, :, None, None]  # (c, bk, 1, 1)
            positional = positions_visible(query_pos[None, :], key_pos[:, None], spec.causal, spec.window)  # (bk, bq)
            if positional is not None:
                visible = visible & positional[None, :, None, :]  # (c, bk, 1, bq)
            s = jnp.einsum("CKH,CGQH->CKGQ", k_blk, q_blk, precision=precision) * spec.scale  # (c, bk, G, bq)
            s = cap_scores(s, spec.softcap)  # (c, bk, G, bq)
            p = jnp.exp(jnp.where(visible, s - lse_blk[:, None], MASK_VALUE))  # (c, bk, G, bq)
            if pool is None:
                received = received + jnp.einsum("CKGQ,Q->CKG", p, weight_blk, precision=stats_precision)  # (c, bk, G)
                return received, bin_sums
            # One matmul for both: the block's local bin one-hot plus the query weights.
            bins = jnp.where(query_pos < length, query_pos * pool // length, -1)  # (bq,)
            first = jnp.clip(i * bq * pool // length, 0, pool - local_bins)  # first bin this block can meet
            local = jax.nn.one_hot(bins - first, local_bins, dtype=acc)  # (bq, L); padding rows 0
            weights = jnp.concatenate([local, weight_blk[:, None]], axis=1)  # (bq, L + 1)
            tile_sums = jnp.einsum("CKGQ,QL->CKGL", p, weights, precision=stats_precision)  # (c, bk, G, L + 1)
            received = received + tile_sums[..., local_bins]  # (c, bk, G)
            current = lax.dynamic_slice_in_dim(bin_sums, first, local_bins, axis=3)  # (c, bk, G, L)
            bin_sums = lax.dynamic_update_slice_in_dim(
                bin_sums, current + tile_sums[..., :local_bins], first, axis=3)  # (c, bk, G, P)
            return received, bin_sums

        received0 = jnp.zeros((c, bk, groups), acc)  # (c, bk, G)
        bin_sums0 = jnp.zeros((c, bk, groups, pool) if pool else (c, groups), acc)  # (c, bk, G, P)
        lower, upper = query_block_range(jk * bk, jk * bk + bk - 1, bq, cfg.num_query_blocks,
                                         spec.causal, spec.window)
        received, bin_sums = lax.fori_loop(lower, upper, step, (received0, bin_sums0))
        if pool is not None:
            key_bins = jnp.where(key_pos < length, key_pos * pool // length, -1)  # (bk,)
            key_one_hot = jax.nn.one_hot(key_bins, pool, dtype=acc)  # (bk, P); padding rows 0
            pooled = pooled + jnp.einsum("CKGA,KB->CGAB", bin_sums, key_one_hot, precision=stats_precision)  # (c, G, P, P)
        return pooled, received

    pooled0 = jnp.zeros((c, groups, pool, pool) if pool else (c, groups), acc)  # (c, G, P, P)
    pooled, received = lax.scan(key_block, pooled0, jnp.arange(padded // bk, dtype=jnp.int32))
    # received: (nk, c, bk, G)
    received = jnp.transpose(received, (1, 3, 0, 2)).reshape(c, groups, padded)  # (c, G, Tp)
    return received, pooled


def columns(q, k, key_mask, query_weight, lse, cfg: Config):
    """received (B, Hq, Tp) and pooled sums (B, Hq, P, P) (or a placeholder) from
    q (B, T, Hq, H), k (B, T, Hkv, H), key_mask (B, Tp), query_weight (B, Tp) and
    lse (B, Hq, Tp)."""
    batch, _, heads, _ = q.shape
    kv_heads = k.shape[2]

    def step(carry, index):
        b, kv0 = group_origin(index, kv_heads, cfg)
        q_g, k_g = take_queries(q, b, kv0, cfg), take_keys(k, b, kv0, cfg)  # (c, G, Tp, H), (c, Tp, H)
        return carry, column_group(q_g, k_g, group_key_visible(key_mask, b, cfg), query_weight[b],
                                   take_rows(lse, b, kv0, cfg), cfg)

    steps = jnp.arange(num_steps(batch, kv_heads, cfg), dtype=jnp.int32)
    _, (received, pooled) = lax.scan(step, None, steps)  # (S, c, G, Tp), (S, c, G, P, P)
    return stack_rows(received, batch, heads), stack_rows(pooled, batch, heads)
