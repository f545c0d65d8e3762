"""The blockwise forward pass: online softmax with the row statistics riding along.

Within a step (one batch element, ``block_heads`` kv heads and their query heads)
the pass walks query blocks (``lax.map``) and, inside each, the key blocks that can
hold a visible key (``lax.fori_loop`` over ``spec.key_block_range``: under causal it
stops at the diagonal, with a window of W it starts W keys before the block, so a
windowed layer costs O(T W)). It keeps the FlashAttention running max ``m``,
normaliser ``l`` and output accumulator per query (Dao et al. 2022; Milakov &
Gimelshein 2018). Memory is O(T): a few (c, G, block_q, block_k) tiles at a time.

Row statistics are rescaled exactly like ``l``:

- entropy: with ``E = sum_k exp(s_k - m) (s_k - m)``, the row entropy is
  ``log l - E / l`` (H = lse - sum_k p_k s_k, rearranged to avoid cancellation);
  when the running max moves from m to m', ``E' = c (E + (m - m') l)`` with
  ``c = exp(m - m')``;
- max_prob = ``exp(m - lse) = 1 / l``;
- argmax: the first key reaching the block max, kept when a later block's max is
  strictly larger (so the first maximum wins ties);
- mean_distance: ``sum_k exp(s_k - m) |i - k|``, rescaled by ``c``, divided by ``l``.

Invisible scores are set to MASK_VALUE and the running max starts at ``M_INIT``, so
their ``exp(s - m)`` is exactly 0; a row with no visible key ends with ``l = 0`` and
gets zeros. Weighted row sums are einsums: XLA:CPU reduces ``sum(a * b)`` of two
tiles over ten times slower than the dot. ``first_mass``, ``self_mass`` and
``prev_mass`` are single entries of each row, read at the end of a step as
``exp(s_ij - lse_i)`` from one q.k product per query (``common.diagonal_masses``).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

from attnjax.kernels.blockwise_common import (
    Config,
    group_key_visible,
    group_origin,
    key_tile_segments,
    masked_scores,
    num_steps,
    put_queries,
    stack_rows,
    take_keys,
    take_queries,
    tile_scores,
    tile_visible,
)
from attnjax.kernels.common import M_INIT, diagonal_masses
from attnjax.kernels.reference import accumulation_dtype, matmul_precision
from attnjax.kernels.spec import key_block_range

# Key position used as "no candidate" when searching a block for its first maximum.
_NO_POSITION = float(2 ** 30)


def forward_group(q, k, v, key_vis, cfg: Config):
    """Online-softmax forward for one step. q: (c, G, Tp, H); k, v: (c, Tp, H);
    key_vis: (c, Tp) bool.

    Returns out (c, G, Tp, H) in q's dtype and per-query rows (c, G, Tp): (lse,) or,
    with ``spec.stats``, (lse, entropy, max_prob, argmax, mean_distance, first_mass,
    self_mass, prev_mass).
    """
    c, groups, padded, head_dim = q.shape
    spec = cfg.spec
    acc = accumulation_dtype(q.dtype)
    precision = matmul_precision(q.dtype)
    stats_precision = lax.Precision.HIGHEST  # sums of float32 p: no TF32 or bf16 passes
    bq, bk = cfg.block_q, cfg.block_k

    def query_block(iq):
        q_blk = lax.dynamic_slice_in_dim(q, iq * bq, bq, axis=2).astype(acc)  # (c, G, bq, H)
        query_pos = iq * bq + jnp.arange(bq, dtype=jnp.int32)  # (bq,)

        def tile(j, carry, edge, side):
            m, l, o, entropy_sum, distance_sum, argmax = carry
            k_blk = lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1).astype(acc)  # (c, bk, H)
            v_blk = lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1).astype(acc)  # (c, bk, H)
            key_blk = lax.dynamic_slice_in_dim(key_vis, j * bk, bk, axis=1)  # (c, bk)
            key_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)  # (bk,)
            visible = tile_visible(key_blk, key_pos, query_pos, spec, edge)  # (c, 1, bq | 1, bk)
            s = masked_scores(tile_scores(q_blk, k_blk, spec, precision), visible)  # (c, G, bq, bk)
            m_blk = jnp.max(s, axis=-1)  # (c, G, bq)
            m_new = jnp.maximum(m, m_blk)  # (c, G, bq)
            correction = jnp.exp(m - m_new)  # (c, G, bq)
            shifted = s - m_new[..., None]  # (c, G, bq, bk)
            p = jnp.exp(shifted)  # (c, G, bq, bk); exactly 0 at invisible keys (m_new >= M_INIT)
            p_sum = jnp.sum(p, axis=-1)  # (c, G, bq)
            l_new = correction * l + p_sum  # (c, G, bq)
            pv = jnp.einsum("CGQK,CKH->CGQH", p, v_blk, precision=precision)  # (c, G, bq, H)
            o_new = correction[..., None] * o + pv  # (c, G, bq, H)
            if spec.stats:
                # Weighted row sums as einsums: XLA:CPU reduces sum(a * b) of two
                # tiles over an order of magnitude slower than the equivalent dot.
                p_shifted = jnp.einsum("CGQK,CGQK->CGQ", p, shifted, precision=stats_precision)  # (c, G, bq)
                entropy_sum = correction * (entropy_sum + (m - m_new) * l) + p_shifted  # (c, G, bq)
                p_distance = _distance_sum(p, p_sum, query_pos, key_pos, side, acc,
                                           stats_precision)  # (c, G, bq)
                distance_sum = correction * distance_sum + p_distance  # (c, G, bq)
                # A masked score equals m_blk only when m_blk == MASK_VALUE < m: never kept.
                # The search runs on float32 positions (exact below 2^24; a float min
                # vectorises better on XLA:CPU than an int32 one).
                is_max = s == m_blk[..., None]  # (c, G, bq, bk)
                key_pos_f = key_pos.astype(jnp.float32)[None, None, None, :]  # (1, 1, 1, bk)
                first_max = jnp.min(jnp.where(is_max, key_pos_f, _NO_POSITION), axis=-1)  # (c, G, bq)
                argmax = jnp.where(m_blk > m, first_max.astype(jnp.int32), argmax)  # (c, G, bq)
            return m_new, l_new, o_new, entropy_sum, distance_sum, argmax

        row_zeros = jnp.zeros((c, groups, bq), acc)  # (c, G, bq)
        init = (
            jnp.full((c, groups, bq), M_INIT, acc), row_zeros,
            jnp.zeros((c, groups, bq, head_dim), acc), row_zeros, row_zeros,
            jnp.zeros((c, groups, bq), jnp.int32),
        )
        lower, upper = key_block_range(iq * bq, iq * bq + bq - 1, bk, cfg.num_key_blocks,
                                       spec.causal, spec.window)
        carry = init
        for segment in key_tile_segments(iq * bq, iq * bq + bq - 1, lower, upper, cfg):
            step = functools.partial(tile, edge=segment.edge, side=segment.side)
            carry = lax.fori_loop(segment.start, segment.end, step, carry)
        m, l, o, entropy_sum, distance_sum, argmax = carry
        return _finish_rows(m, l, o, entropy_sum, distance_sum, argmax, q.dtype, spec.stats)

    out, rows = lax.map(query_block, jnp.arange(padded // bq, dtype=jnp.int32))
    # out (nq, c, G, bq, H), each row (nq, c, G, bq)
    out = jnp.moveaxis(out, 0, 2).reshape(c, groups, padded, head_dim)  # (c, G, Tp, H)
    rows = tuple(jnp.moveaxis(r, 0, 2).reshape(c, groups, padded) for r in rows)  # (c, G, Tp) each
    if spec.stats:
        lse, max_prob = rows[0], rows[2]
        rows = rows + diagonal_masses(q, k[:, None], lse, key_vis[:, None, :], max_prob > 0, spec)  # + 3 x (c, G, Tp)
    return out, rows


def _distance_sum(p, p_sum, query_pos, key_pos, side: str, acc, precision):
    """(c, G, bq): ``sum_k p_ik |i - k|`` over one tile; p: (c, G, bq, bk), p_sum its
    row sums (c, G, bq); query_pos (bq,), key_pos (bk,).

    On a tile whose keys all lie before the block's queries, ``|i - k| = (i - e) +
    (e - k)`` with e the tile's last key, both terms >= 0 (no cancellation), so the
    sum is ``(i - e) sum_k p_ik + p (e - k)``: a matrix-vector product instead of a
    (bq, bk) distance tile (symmetrically, with the first key, after the queries).
    Only a tile across the diagonal needs the elementwise distance.
    """
    if side == "across":
        distance = jnp.abs(query_pos[:, None] - key_pos[None, :]).astype(acc)  # (bq, bk)
        return jnp.einsum("CGQK,QK->CGQ", p, distance, precision=precision)  # (c, G, bq)
    if side == "before":
        anchor = key_pos[-1]
        key_offset, query_offset = anchor - key_pos, query_pos - anchor  # (bk,), (bq,): both >= 0
    else:
        anchor = key_pos[0]
        key_offset, query_offset = key_pos - anchor, anchor - query_pos  # (bk,), (bq,): both >= 0
    inside = jnp.einsum("CGQK,K->CGQ", p, key_offset.astype(acc), precision=precision)  # (c, G, bq)
    return query_offset.astype(acc)[None, None] * p_sum + inside  # (c, G, bq)


def _finish_rows(m, l, o, entropy_sum, distance_sum, argmax, out_dtype, with_stats):
    """Normalise one query block's accumulators. A row with l == 0 saw no visible key."""
    valid = l > 0  # (..., bq)
    l_safe = jnp.where(valid, l, 1.0)  # (..., bq)
    out = (o / l_safe[..., None]).astype(out_dtype)  # (..., bq, H); zero rows stay zero
    log_l = jnp.log(l_safe)  # (..., bq)
    lse = jnp.where(valid, m + log_l, 0.0)  # (..., bq)
    if not with_stats:
        return out, (lse,)
    entropy = jnp.where(valid, log_l - entropy_sum / l_safe, 0.0)  # (..., bq)
    max_prob = jnp.where(valid, 1.0 / l_safe, 0.0)  # (..., bq)
    mean_distance = distance_sum / l_safe  # (..., bq)
    return out, (lse, entropy, max_prob, argmax, mean_distance)


def forward(q, k, v, key_mask, cfg: Config):
    """q: (B, T, Hq, H); k, v: (B, T, Hkv, H); key_mask: (B, Tp) bool.
    Returns out (B, T, Hq, H) and rows (B, Hq, Tp) each."""
    batch, _, heads, _ = q.shape
    kv_heads = k.shape[2]

    def step(out, index):
        b, kv0 = group_origin(index, kv_heads, cfg)
        q_g = take_queries(q, b, kv0, cfg)  # (c, G, Tp, H)
        k_g, v_g = take_keys(k, b, kv0, cfg), take_keys(v, b, kv0, cfg)  # (c, Tp, H) each
        out_g, rows = forward_group(q_g, k_g, v_g, group_key_visible(key_mask, b, cfg), cfg)
        return put_queries(out, out_g, b, kv0), rows

    steps = jnp.arange(num_steps(batch, kv_heads, cfg), dtype=jnp.int32)
    out, rows = lax.scan(step, jnp.zeros_like(q), steps)  # rows (S, c, G, Tp) each
    return out, tuple(stack_rows(r, batch, heads) for r in rows)  # (B, Hq, Tp) each
