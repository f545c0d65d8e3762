"""Pallas forward kernel: online softmax (FlashAttention-2) with the row statistics.

One program per (query block, batch, query head); the loop over key blocks runs
inside the kernel (``lax.fori_loop``), as in JAX's ``ops/gpu/attention.py``: the
Triton backend has no scratch memory, so the whole K/V of one kv head is the block.
Under grouped-query attention the K/V BlockSpecs map query head h to kv head
``h // groups``, so the G query heads of a group read the same K/V and nothing is
repeated in memory.

Only key blocks that can hold a visible key are visited (``spec.key_block_range``):
under causal the loop stops at the diagonal; with a window of W it also starts at the
block of key ``first_query - W + 1``, so a windowed call costs O(T W). Of those, only
the tiles at the band's edges (the window's far end, the diagonal, sequence padding)
pay for the positional mask; the interior ones apply the key mask alone.

With ``stats`` the row statistics ride in the same loop, rescaled exactly like the
normaliser ``l`` (definitions in ``attnjax.kernels.stats``):
entropy from ``E = sum exp(s - m)(s - m)`` as ``log l - E / l``; max_prob = 1 / l;
the first argmax (a later block replaces it only with a strictly larger max); the
mean distance ``sum exp(s - m)|i - j| / l``. Scores are soft-capped before masking,
so the statistics see the capped scores.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from attnjax.kernels.common import M_INIT
from attnjax.kernels.pallas_common import (
    NO_INDEX,
    KernelConfig,
    dot,
    has_edges,
    interior_key_blocks,
    kv_head,
    masked,
    num_blocks,
    pallas_call,
    scores,
    visibility,
)
from attnjax.kernels.reference import accumulation_dtype, matmul_precision
from attnjax.kernels.spec import key_block_range


def _forward_kernel(q_ref, k_ref, v_ref, kmask_ref, o_ref, lse_ref, *stat_refs, cfg: KernelConfig):
    spec = cfg.spec
    bq, bk = cfg.block_q, cfg.block_k
    acc = accumulation_dtype(q_ref.dtype)
    precision = matmul_precision(q_ref.dtype)
    first_query = pl.program_id(0) * bq
    q = q_ref[...]  # (bq, Dp)
    query_pos = first_query + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)  # (bq, 1)

    def body(j, carry, edge):
        m, l, o, entropy_sum, distance_sum, argmax = carry
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]  # (bk, Dp)
        v = v_ref[pl.ds(start, bk), :]  # (bk, Dp)
        key_pos = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)  # (1, bk)
        kmask_row = kmask_ref[:, pl.ds(start, bk)] if cfg.key_mask else None  # (1, bk)
        visible = visibility(cfg, kmask_row, key_pos, query_pos, edge)  # (bq | 1, bk) or None
        s = masked(scores(q, k, spec, acc, precision), visible)  # (bq, bk)
        m_blk = jnp.max(s, axis=1, keepdims=True)  # (bq, 1)
        m_new = jnp.maximum(m, m_blk)  # (bq, 1)
        correction = jnp.exp(m - m_new)  # (bq, 1)
        shifted = s - m_new  # (bq, bk)
        p = jnp.exp(shifted)  # (bq, bk); exactly 0 at invisible keys (m_new >= M_INIT)
        l_new = correction * l + jnp.sum(p, axis=1, keepdims=True)  # (bq, 1)
        o_new = correction * o + dot(p.astype(v.dtype), v, (1, 0), acc, precision)  # (bq, Dp)
        if spec.stats:
            entropy_sum = (correction * (entropy_sum + (m - m_new) * l)
                           + jnp.sum(p * shifted, axis=1, keepdims=True))  # (bq, 1)
            distance = jnp.abs((query_pos - key_pos).astype(acc))  # (bq, bk)
            distance_sum = correction * distance_sum + jnp.sum(p * distance, axis=1, keepdims=True)  # (bq, 1)
            is_max = s == m_blk  # (bq, bk); a masked score only ties when m_blk = MASK_VALUE < m
            first_max = jnp.min(jnp.where(is_max, key_pos, NO_INDEX), axis=1, keepdims=True)  # (bq, 1)
            argmax = jnp.where(m_blk > m, first_max, argmax)  # (bq, 1)
        return m_new, l_new, o_new, entropy_sum, distance_sum, argmax

    row_zeros = jnp.zeros((bq, 1), acc)  # (bq, 1)
    init = (
        jnp.full((bq, 1), M_INIT, acc), row_zeros, jnp.zeros(o_ref.shape, acc),
        row_zeros, row_zeros, jnp.zeros((bq, 1), jnp.int32),
    )
    last_query = first_query + bq - 1
    lower, upper = key_block_range(first_query, last_query, bk, num_blocks(cfg.length, bk),
                                   spec.causal, spec.window)
    # Masks cost a select per score: only the edge tiles of the band get the positional one.
    interior_lower, interior_upper = interior_key_blocks(first_query, last_query, lower, upper, bk, cfg)
    front, back = has_edges(cfg)
    carry = init
    if front:
        carry = lax.fori_loop(lower, interior_lower, functools.partial(body, edge=True), carry)
    carry = lax.fori_loop(interior_lower, interior_upper, functools.partial(body, edge=False), carry)
    if back:
        carry = lax.fori_loop(interior_upper, upper, functools.partial(body, edge=True), carry)
    m, l, o, entropy_sum, distance_sum, argmax = carry

    valid = l > 0  # (bq, 1); False for a query with no visible key
    l_safe = jnp.where(valid, l, 1.0)  # (bq, 1)
    log_l = jnp.log(l_safe)  # (bq, 1)
    o_ref[...] = (o / l_safe).astype(o_ref.dtype)  # (bq, Dp)
    lse_ref[...] = jnp.where(valid, m + log_l, 0.0).astype(lse_ref.dtype)  # (bq, 1)
    if spec.stats:
        entropy_ref, max_prob_ref, argmax_ref, distance_ref = stat_refs
        entropy_ref[...] = jnp.where(valid, log_l - entropy_sum / l_safe, 0.0).astype(entropy_ref.dtype)
        max_prob_ref[...] = jnp.where(valid, 1.0 / l_safe, 0.0).astype(max_prob_ref.dtype)
        argmax_ref[...] = argmax
        distance_ref[...] = (distance_sum / l_safe).astype(distance_ref.dtype)


def forward(q, k, v, kmask, cfg: KernelConfig):
    """q: (B, Hq, Tp, Dp); k, v: (B, Hkv, Tp, Dp); kmask: (B, 1, Tp) int32.

    Returns out (B, Hq, Tp, Dp) and per-query rows (B, Hq, Tp): (lse,) or, with
    stats, (lse, entropy, max_prob, argmax, mean_distance).
    """
    batch, heads, padded, head_dim = q.shape
    acc = accumulation_dtype(q.dtype)
    bq, groups = cfg.block_q, cfg.spec.groups
    grid = (padded // bq, batch, heads)
    row_spec = pl.BlockSpec((None, None, bq, 1), lambda i, b, h: (b, h, i, 0))
    row_shape = jax.ShapeDtypeStruct((batch, heads, padded, 1), acc)
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), row_shape]
    out_specs = [pl.BlockSpec((None, None, bq, head_dim), lambda i, b, h: (b, h, i, 0)), row_spec]
    if cfg.spec.stats:
        out_shape += [row_shape, row_shape,
                      jax.ShapeDtypeStruct((batch, heads, padded, 1), jnp.int32), row_shape]
        out_specs += [row_spec] * 4
    # One kv head's whole K or V: query head h reads kv head h // groups.
    whole_kv = pl.BlockSpec((None, None, padded, head_dim),
                            lambda i, b, h: (b, kv_head(h, groups), 0, 0))
    out, *rows = pallas_call(
        functools.partial(_forward_kernel, cfg=cfg), cfg, grid=grid,
        in_specs=[
            pl.BlockSpec((None, None, bq, head_dim), lambda i, b, h: (b, h, i, 0)),  # q
            whole_kv, whole_kv,  # k, v
            pl.BlockSpec((None, 1, padded), lambda i, b, h: (b, 0, 0)),  # key mask
        ],
        out_specs=out_specs, out_shape=out_shape, name="attnjax_forward",
    )(q, k, v, kmask)
    return out, tuple(r[..., 0] for r in rows)  # rows (B, Hq, Tp) each
