"""XLA blockwise attention with online softmax and streaming statistics (any backend).

The forward pass walks query blocks (``lax.map``) and, inside each, key blocks
(``lax.fori_loop``), keeping the FlashAttention running max ``m``, normaliser ``l`` and
output accumulator per query (Dao et al. 2022; Milakov & Gimelshein 2018). Memory is
O(T): one (block_heads, block_q, block_k) tile of scores at a time, never the T x T
matrix; (batch, head) pairs are walked ``block_heads`` at a time (one by default,
which keeps a tile in cache on CPU). Under ``causal`` the key loop stops at the
diagonal.

Row statistics ride along in the same loop, rescaled exactly like ``l``:

- entropy: with ``E = sum_k exp(s_k - m) (s_k - m)``, the row entropy is
  ``log l - E / l`` (H = lse - sum_k p_k s_k, rearranged to avoid cancellation);
  when the running max moves from m to m', ``E' = c (E + (m - m') l)`` with
  ``c = exp(m - m')``;
- max_prob = ``exp(m - lse) = 1 / l``;
- argmax: the first key reaching the block max, kept when a later block's max is
  strictly larger (so the first maximum wins ties);
- masking: invisible scores are set to MASK_VALUE and the running max starts at
  ``M_INIT = MASK_VALUE / 2``, so their ``exp(s - m)`` is exactly 0; a row with no
  visible key ends with ``l = 0`` and gets zeros;
- mean_distance: ``sum_k exp(s_k - m) |i - k|``, rescaled by ``c``, divided by ``l``.

``first_mass``, ``self_mass`` and ``prev_mass`` are single entries of each row:
they are read after the pass as ``exp(s_ij - lse_i)`` from one q.k product per
query (O(T H), ``diagonal_masses``). ``received`` and ``pooled`` need the finished
LSE, so a second pass walks key blocks and recomputes ``p = exp(s - lse)`` tile by
tile (``_column_pass``).

Gradients come from a ``jax.custom_vjp`` with the FlashAttention-2 backward
(recompute p from the saved LSE; ``dS = P * (dP - rowsum(dO * O))``), also O(T)
memory. The statistics carry no gradient (they pass through ``lax.stop_gradient``).

The helpers at the bottom (layout, row validity, diagonal masses, pooled maps,
assembling ``AttentionStats``) are shared with the Pallas path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from attnjax.kernels.reference import (
    MASK_VALUE,
    accumulation_dtype,
    default_scale,
    matmul_precision,
    pool_bins,
)
from attnjax.kernels.stats import AttentionStats

# Key index used as "no candidate" when searching a block for its first maximum.
_NO_INDEX = jnp.iinfo(jnp.int32).max
# Initial running max: finite, and far above MASK_VALUE, so exp(MASK_VALUE - m) is
# exactly 0 even for a row that has seen no visible key yet (no second mask needed).
M_INIT = 0.5 * MASK_VALUE


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the XLA blockwise kernel.

    block_q x block_k scores per step, for block_heads (batch, head) pairs at once.
    Each step holds a few (block_heads, block_q, block_k) tiles in the accumulation
    dtype. On CPU one head at a time with 512 x 512 tiles (1 MiB) keeps the
    elementwise work in cache and was fastest on a 2-core machine
    (benchmarks/long_context.py); on an accelerator raise block_heads.
    """

    block_q: int = 512
    block_k: int = 512
    block_heads: int = 1

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockSizes.{name}={value!r} must be a positive int.")


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static description of one blockwise call (hashable: a custom_vjp nondiff arg)."""

    scale: float
    causal: bool
    block_q: int
    block_k: int
    block_heads: int
    length: int      # real sequence length T (arrays are padded to a multiple of both blocks)
    stats: bool      # also compute the row statistics in the forward loop


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _visible(key_vis, key_pos, query_pos, causal: bool):
    """(G, bq, bk) or (G, 1, bk) bool: key mask (G, bk) and, under causal, k <= i."""
    visible = key_vis[:, None, :]  # (G, 1, bk)
    if causal:
        lower = key_pos[None, :] <= query_pos[:, None]  # (bq, bk)
        visible = visible & lower[None]  # (G, bq, bk)
    return visible


def _map_groups(fn, arrays, block_heads: int):
    """Apply ``fn`` to chunks of ``block_heads`` rows of every array's leading
    (batch * heads) axis, sequentially (lax.map); returns fn's outputs re-joined."""
    groups = arrays[0].shape[0]
    padded = round_up(groups, block_heads)

    def chunk(x):
        x = jnp.pad(x, [(0, padded - groups)] + [(0, 0)] * (x.ndim - 1))  # (G', ...)
        return x.reshape((padded // block_heads, block_heads) + x.shape[1:])  # (S, g, ...)

    outputs = lax.map(lambda chunked: fn(*chunked), tuple(chunk(x) for x in arrays))
    return jax.tree.map(lambda y: y.reshape((padded,) + y.shape[2:])[:groups], outputs)


# --------------------------------------------------------------------------- forward


def _forward_group(q, k, v, key_mask, cfg: _Config):
    """Online-softmax forward for g (batch, head) pairs. q, k, v: (g, Tp, H); key_mask: (g, Tp).

    Returns out (g, Tp, H) in q's dtype and a tuple of per-query rows (g, Tp):
    (lse,) or, with ``cfg.stats``, (lse, entropy, max_prob, argmax, mean_distance).
    """
    groups, padded, head_dim = q.shape
    acc = accumulation_dtype(q.dtype)
    precision = matmul_precision(q.dtype)
    bq, bk = cfg.block_q, cfg.block_k
    num_key_blocks = -(-cfg.length // bk)

    def query_block(iq):
        q_blk = lax.dynamic_slice_in_dim(q, iq * bq, bq, axis=1).astype(acc)  # (g, bq, H)
        query_pos = iq * bq + jnp.arange(bq, dtype=jnp.int32)  # (bq,)

        def step(j, carry):
            m, l, o, entropy_sum, distance_sum, argmax = carry
            k_blk = lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1).astype(acc)  # (g, bk, H)
            v_blk = lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1).astype(acc)  # (g, bk, H)
            key_vis = lax.dynamic_slice_in_dim(key_mask, j * bk, bk, axis=1)  # (g, bk)
            key_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)  # (bk,)
            visible = _visible(key_vis, key_pos, query_pos, cfg.causal)  # (g, bq | 1, bk)
            s = jnp.einsum("GQH,GKH->GQK", q_blk, k_blk, precision=precision) * cfg.scale  # (g, bq, bk)
            s = jnp.where(visible, s, MASK_VALUE)  # (g, bq, bk)
            m_blk = jnp.max(s, axis=-1)  # (g, bq)
            m_new = jnp.maximum(m, m_blk)  # (g, bq)
            correction = jnp.exp(m - m_new)  # (g, bq)
            shifted = s - m_new[..., None]  # (g, bq, bk)
            p = jnp.exp(shifted)  # (g, bq, bk); exactly 0 at invisible keys (m_new >= M_INIT)
            l_new = correction * l + jnp.sum(p, axis=-1)  # (g, bq)
            pv = jnp.einsum("GQK,GKH->GQH", p, v_blk, precision=precision)  # (g, bq, H)
            o_new = correction[..., None] * o + pv  # (g, bq, H)
            if cfg.stats:
                # Weighted row sums as einsums: XLA:CPU reduces sum(a * b) of two
                # tiles over an order of magnitude slower than the equivalent dot.
                p_shifted = jnp.einsum("GQK,GQK->GQ", p, shifted, precision=precision)  # (g, bq)
                entropy_sum = correction * (entropy_sum + (m - m_new) * l) + p_shifted  # (g, bq)
                distance = jnp.abs(query_pos[:, None] - key_pos[None, :]).astype(acc)  # (bq, bk)
                p_distance = jnp.einsum("GQK,QK->GQ", p, distance, precision=precision)  # (g, bq)
                distance_sum = correction * distance_sum + p_distance  # (g, bq)
                # A masked score equals m_blk only when m_blk == MASK_VALUE < m: never kept.
                is_max = s == m_blk[..., None]  # (g, bq, bk)
                first_max = jnp.min(jnp.where(is_max, key_pos, _NO_INDEX), axis=-1)  # (g, bq)
                argmax = jnp.where(m_blk > m, first_max, argmax)  # (g, bq)
            return m_new, l_new, o_new, entropy_sum, distance_sum, argmax

        row_zeros = jnp.zeros((groups, bq), acc)  # (g, bq)
        init = (
            jnp.full((groups, bq), M_INIT, acc), row_zeros,
            jnp.zeros((groups, bq, head_dim), acc), row_zeros, row_zeros,
            jnp.zeros((groups, bq), jnp.int32),
        )
        if cfg.causal:
            upper = jnp.minimum(((iq + 1) * bq + bk - 1) // bk, num_key_blocks)
        else:
            upper = num_key_blocks
        m, l, o, entropy_sum, distance_sum, argmax = lax.fori_loop(0, upper, step, init)
        return _finish_rows(m, l, o, entropy_sum, distance_sum, argmax, q.dtype, cfg.stats)

    out, rows = lax.map(query_block, jnp.arange(padded // bq, dtype=jnp.int32))
    # out (nq, g, bq, H), each row (nq, g, bq)
    out = jnp.moveaxis(out, 0, 1).reshape(groups, padded, head_dim)  # (g, Tp, H)
    rows = tuple(jnp.moveaxis(r, 0, 1).reshape(groups, padded) for r in rows)  # (g, Tp) each
    return out, rows


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


# --------------------------------------------------------------------------- backward


def _backward_group(q, k, v, key_mask, out, lse, d_out, cfg: _Config):
    """FlashAttention-2 gradients in XLA loops for g (batch, head) pairs; arrays (g, Tp, ...)."""
    groups, padded, head_dim = q.shape
    acc = accumulation_dtype(q.dtype)
    precision = matmul_precision(q.dtype)
    bq, bk = cfg.block_q, cfg.block_k
    num_query_blocks = -(-cfg.length // bq)
    delta = jnp.einsum("GTH,GTH->GT", out.astype(acc), d_out.astype(acc), precision=precision)  # (g, Tp)

    def key_block(dq, jk):
        k_blk = lax.dynamic_slice_in_dim(k, jk * bk, bk, axis=1).astype(acc)  # (g, bk, H)
        v_blk = lax.dynamic_slice_in_dim(v, jk * bk, bk, axis=1).astype(acc)  # (g, bk, H)
        key_vis = lax.dynamic_slice_in_dim(key_mask, jk * bk, bk, axis=1)  # (g, bk)
        key_pos = jk * bk + jnp.arange(bk, dtype=jnp.int32)  # (bk,)

        def step(i, carry):
            dk, dv, dq = carry
            q_blk = lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1).astype(acc)  # (g, bq, H)
            do_blk = lax.dynamic_slice_in_dim(d_out, i * bq, bq, axis=1).astype(acc)  # (g, bq, H)
            lse_blk = lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=1)  # (g, bq)
            delta_blk = lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=1)  # (g, bq)
            query_pos = i * bq + jnp.arange(bq, dtype=jnp.int32)  # (bq,)
            visible = _visible(key_vis, key_pos, query_pos, cfg.causal)  # (g, bq | 1, bk)
            s = jnp.einsum("GQH,GKH->GQK", q_blk, k_blk, precision=precision) * cfg.scale  # (g, bq, bk)
            p = jnp.exp(jnp.where(visible, s - lse_blk[..., None], MASK_VALUE))  # (g, bq, bk)
            dv = dv + jnp.einsum("GQK,GQH->GKH", p, do_blk, precision=precision)  # (g, bk, H)
            dp = jnp.einsum("GQH,GKH->GQK", do_blk, v_blk, precision=precision)  # (g, bq, bk)
            ds = p * (dp - delta_blk[..., None])  # (g, bq, bk)
            dk = dk + jnp.einsum("GQK,GQH->GKH", ds, q_blk, precision=precision)  # (g, bk, H)
            dq_blk = lax.dynamic_slice_in_dim(dq, i * bq, bq, axis=1)  # (g, bq, H)
            dq_blk = dq_blk + jnp.einsum("GQK,GKH->GQH", ds, k_blk, precision=precision)  # (g, bq, H)
            dq = lax.dynamic_update_slice_in_dim(dq, dq_blk, i * bq, axis=1)  # (g, Tp, H)
            return dk, dv, dq

        lower_block = (jk * bk) // bq if cfg.causal else 0
        zeros = jnp.zeros((groups, bk, head_dim), acc)  # (g, bk, H)
        dk, dv, dq = lax.fori_loop(lower_block, num_query_blocks, step, (zeros, zeros, dq))
        return dq, (dk, dv)

    dq0 = jnp.zeros((groups, padded, head_dim), acc)  # (g, Tp, H)
    dq, (dk, dv) = lax.scan(key_block, dq0, jnp.arange(padded // bk, dtype=jnp.int32))
    # dk, dv: (nk, g, bk, H)
    dk = jnp.moveaxis(dk, 0, 1).reshape(groups, padded, head_dim)  # (g, Tp, H)
    dv = jnp.moveaxis(dv, 0, 1).reshape(groups, padded, head_dim)  # (g, Tp, H)
    dq = dq * cfg.scale  # (g, Tp, H)
    dk = dk * cfg.scale  # (g, Tp, H)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, key_mask, cfg: _Config):
    """q, k, v: (G, Tp, H) for G = batch * heads; key_mask (G, Tp). -> out, rows (G, Tp)."""
    return _map_groups(functools.partial(_forward_group, cfg=cfg), (q, k, v, key_mask), cfg.block_heads)


def _flash_fwd(q, k, v, key_mask, cfg: _Config):
    out, rows = _flash(q, k, v, key_mask, cfg)
    return (out, rows), (q, k, v, key_mask, out, rows[0])


def _flash_bwd(cfg: _Config, residuals, cotangents):
    q, k, v, key_mask, out, lse = residuals
    d_out, _ = cotangents  # the rows are statistics: no gradient flows through them
    dq, dk, dv = _map_groups(functools.partial(_backward_group, cfg=cfg),
                             (q, k, v, key_mask, out, lse, d_out), cfg.block_heads)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# --------------------------------------------------------------------------- second pass


def _column_group(q, k, key_mask, query_weight, lse, cfg: _Config, pool: Optional[int]):
    """Column sums of p = exp(s - lse) by key block, recomputed tile by tile.

    q, k: (g, Tp, H); key_mask: (g, Tp) bool; query_weight: (g, Tp) (1 at queries
    counted in ``received``); lse: (g, Tp). Returns received (g, Tp) and, with
    ``pool``, the per-key row-bin sums (g, P, Tp): entry (a, k) is the sum of p_ik
    over queries i in pooled bin a (else a dummy zero per group).

    A query block of bq rows meets at most ``local_bins = (bq - 1) P // T + 2`` bins
    (bins are contiguous runs of T / P positions), so each tile is reduced with a
    (bq, local_bins) one-hot matmul and added at the block's first bin, instead of a
    (bq, P) one: at T = 16k, P = 64, bq = 512 that is 3 bins instead of 64.
    """
    groups, padded, head_dim = q.shape
    acc = accumulation_dtype(q.dtype)
    precision = matmul_precision(q.dtype)
    bq, bk, length = cfg.block_q, cfg.block_k, cfg.length
    num_query_blocks = -(-length // bq)
    local_bins = 0 if pool is None else min(pool, (bq - 1) * pool // length + 2)

    def key_block(jk):
        k_blk = lax.dynamic_slice_in_dim(k, jk * bk, bk, axis=1).astype(acc)  # (g, bk, H)
        key_vis = lax.dynamic_slice_in_dim(key_mask, jk * bk, bk, axis=1)  # (g, bk)
        key_pos = jk * bk + jnp.arange(bk, dtype=jnp.int32)  # (bk,)

        def step(i, carry):
            received, bin_sums = carry
            q_blk = lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1).astype(acc)  # (g, bq, H)
            lse_blk = lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=1)  # (g, bq)
            weight_blk = lax.dynamic_slice_in_dim(query_weight, i * bq, bq, axis=1)  # (g, bq)
            query_pos = i * bq + jnp.arange(bq, dtype=jnp.int32)  # (bq,)
            visible = _visible(key_vis, key_pos, query_pos, cfg.causal)  # (g, bq | 1, bk)
            s = jnp.einsum("GQH,GKH->GQK", q_blk, k_blk, precision=precision) * cfg.scale  # (g, bq, bk)
            p = jnp.exp(jnp.where(visible, s - lse_blk[..., None], MASK_VALUE))  # (g, bq, bk)
            received = received + jnp.einsum("GQK,GQ->GK", p, weight_blk, precision=precision)  # (g, bk)
            if pool is not None:
                bins = jnp.where(query_pos < length, query_pos * pool // length, -1)  # (bq,)
                first = jnp.clip(i * bq * pool // length, 0, pool - local_bins)  # first bin this block can meet
                local = jax.nn.one_hot(bins - first, local_bins, dtype=acc)  # (bq, L); padding rows 0
                tile_sums = jnp.einsum("GQK,QL->GLK", p, local, precision=precision)  # (g, L, bk)
                current = lax.dynamic_slice_in_dim(bin_sums, first, local_bins, axis=1)  # (g, L, bk)
                bin_sums = lax.dynamic_update_slice_in_dim(bin_sums, current + tile_sums, first, axis=1)  # (g, P, bk)
            return received, bin_sums

        received0 = jnp.zeros((groups, bk), acc)  # (g, bk)
        if pool is None:
            bin_sums0 = jnp.zeros((groups,), acc)  # unused placeholder
        else:
            bin_sums0 = jnp.zeros((groups, pool, bk), acc)  # (g, P, bk)
        lower_block = (jk * bk) // bq if cfg.causal else 0
        return lax.fori_loop(lower_block, num_query_blocks, step, (received0, bin_sums0))

    received, bin_sums = lax.map(key_block, jnp.arange(padded // bk, dtype=jnp.int32))
    received = jnp.moveaxis(received, 0, 1).reshape(groups, padded)  # (g, Tp)
    if pool is None:
        return received, bin_sums[0]  # (g,) placeholder
    # bin_sums (nk, g, P, bk)
    bin_sums = jnp.moveaxis(bin_sums, 0, 2).reshape(groups, pool, padded)  # (g, P, Tp)
    return received, bin_sums


# --------------------------------------------------------------------------- entry point


@functools.partial(
    jax.jit, static_argnames=("causal", "scale", "stats", "pool", "block_sizes"))
def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: Optional[jax.Array] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    stats: bool = False,
    pool: Optional[int] = None,
    block_sizes: Optional[BlockSizes] = None,
):
    """Blockwise attention in XLA, O(T) memory. Same contract as ``reference_attention``.

    q, k, v: (B, T, N, H); mask: (B, T) bool or None. Returns out (B, T, N, H), and
    with ``stats=True`` also ``AttentionStats`` (float32; float64 for float64 inputs).
    ``block_sizes`` are clipped to the (8-rounded) sequence length.
    """
    batch, length, heads, head_dim = q.shape
    scale = default_scale(head_dim) if scale is None else float(scale)
    sizes = block_sizes or BlockSizes()
    block_q = min(sizes.block_q, round_up(length, 8))
    block_k = min(sizes.block_k, round_up(length, 8))
    padded = round_up(length, math.lcm(block_q, block_k))
    cfg = _Config(scale=scale, causal=causal, block_q=block_q, block_k=block_k,
                  block_heads=min(sizes.block_heads, batch * heads), length=length, stats=stats)
    acc = accumulation_dtype(q.dtype)

    def by_group(x):  # (B, N, Tp, ...) -> (B * N, Tp, ...)
        return x.reshape((batch * heads,) + x.shape[2:])

    def by_head(x):  # (B * N, ...) -> (B, N, ...)
        return x.reshape((batch, heads) + x.shape[1:])

    qh, kh, vh = (heads_major(x, padded) for x in (q, k, v))  # (B, N, Tp, H) each
    key_mask = padded_key_mask(mask, batch, length, padded)  # (B, Tp)
    group_mask = by_group(jnp.broadcast_to(key_mask[:, None], (batch, heads, padded)))  # (G, Tp)
    out, rows = _flash(by_group(qh), by_group(kh), by_group(vh), group_mask, cfg)  # (G, Tp, H), rows (G, Tp)
    out = jnp.swapaxes(by_head(out), 1, 2)[:, :length]  # (B, T, N, H)
    if not stats:
        return out

    qh, kh = lax.stop_gradient(qh), lax.stop_gradient(kh)
    lse, entropy, max_prob, argmax, mean_distance = (lax.stop_gradient(r) for r in rows)  # (G, Tp) each
    query_weight = padded_query_weight(mask, batch, length, padded, acc)  # (B, Tp)
    group_weight = by_group(jnp.broadcast_to(query_weight[:, None], (batch, heads, padded)))  # (G, Tp)
    received, bin_sums = _map_groups(
        functools.partial(_column_group, cfg=cfg, pool=pool),
        (by_group(qh), by_group(kh), group_mask, group_weight, lse), cfg.block_heads,
    )  # (G, Tp), (G, P, Tp)
    return out, assemble_stats(
        qh, kh, mask, causal=causal, scale=scale, length=length, pool=pool,
        lse=by_head(lse), entropy=by_head(entropy), max_prob=by_head(max_prob),
        argmax=by_head(argmax), mean_distance=by_head(mean_distance),
        received=by_head(received), bin_sums=None if pool is None else by_head(bin_sums),
    )


# --------------------------------------------------------------------------- shared helpers


def heads_major(x: jax.Array, padded: int) -> jax.Array:
    """(B, T, N, H) -> (B, N, Tp, H), zero-padded along the sequence."""
    x = jnp.swapaxes(x, 1, 2)  # (B, N, T, H)
    return jnp.pad(x, ((0, 0), (0, 0), (0, padded - x.shape[2]), (0, 0)))  # (B, N, Tp, H)


def padded_key_mask(mask: Optional[jax.Array], batch: int, length: int, padded: int) -> jax.Array:
    """(B, Tp) bool: real, unmasked keys. Sequence padding is masked."""
    if mask is None:
        mask = jnp.ones((batch, length), dtype=bool)  # (B, T)
    return jnp.pad(mask.astype(bool), ((0, 0), (0, padded - length)))  # (B, Tp)


def padded_query_weight(mask: Optional[jax.Array], batch: int, length: int, padded: int,
                        dtype) -> jax.Array:
    """(B, Tp): 1 at the queries ``received`` sums over (non-padding ones), else 0."""
    return padded_key_mask(mask, batch, length, padded).astype(dtype)  # (B, Tp)


def padded_bin_one_hot(length: int, padded: int, pool: int, dtype, width: Optional[int] = None) -> jax.Array:
    """(Tp, width) one-hot of each position's pooled bin; padding rows are zero.

    ``width`` (>= pool, default pool) pads the bin axis with empty bins.
    """
    width = pool if width is None else width
    bins = jnp.pad(pool_bins(length, pool), (0, padded - length), constant_values=-1)  # (Tp,)
    return jax.nn.one_hot(bins, width, dtype=dtype)  # (Tp, width)


def rows_with_keys(mask: Optional[jax.Array], batch: int, length: int, causal: bool) -> jax.Array:
    """(B, T) bool: whether query i has at least one visible key."""
    if mask is None:
        return jnp.ones((batch, length), dtype=bool)  # (B, T)
    mask = mask.astype(bool)  # (B, T)
    if causal:
        return lax.cummax(mask.astype(jnp.int32), axis=1) > 0  # (B, T)
    return jnp.broadcast_to(jnp.any(mask, axis=1, keepdims=True), (batch, length))  # (B, T)


def diagonal_masses(qh, kh, lse, mask, *, causal: bool, scale: float, length: int):
    """first_mass, self_mass, prev_mass (B, N, T), each ``exp(s_ij - lse_i)`` at one key.

    qh, kh: (B, N, Tp, H) heads-major (padded); lse: (B, N, Tp). Key 0, key i and key
    i - 1 are never hidden by causality, so only the key mask and row validity matter.
    """
    acc = accumulation_dtype(qh.dtype)
    batch = qh.shape[0]
    q = qh[:, :, :length].astype(acc)  # (B, N, T, H)
    k = kh[:, :, :length].astype(acc)  # (B, N, T, H)
    lse = lse[:, :, :length]  # (B, N, T)
    # Row-wise dot products as einsums (faster than sum(q * k) on XLA:CPU).
    highest = lax.Precision.HIGHEST
    s_first = jnp.einsum("BNTH,BNH->BNT", q, k[:, :, 0], precision=highest) * scale  # (B, N, T)
    s_self = jnp.einsum("BNTH,BNTH->BNT", q, k, precision=highest) * scale  # (B, N, T)
    s_prev = jnp.einsum("BNTH,BNTH->BNT", q[:, :, 1:], k[:, :, :-1], precision=highest) * scale  # (B, N, T - 1)
    s_prev = jnp.pad(s_prev, ((0, 0), (0, 0), (1, 0)))  # (B, N, T)
    key_ok = padded_key_mask(mask, batch, length, length)  # (B, T)
    prev_ok = jnp.pad(key_ok[:, :-1], ((0, 0), (1, 0)))  # (B, T); query 0 has no previous key
    first_ok = jnp.broadcast_to(key_ok[:, :1], (batch, length))  # (B, T)
    valid = rows_with_keys(mask, batch, length, causal)  # (B, T)

    def mass(score, ok):
        ok = (ok & valid)[:, None, :]  # (B, 1, T)
        return jnp.exp(jnp.where(ok, score - lse, MASK_VALUE))  # (B, N, T); exactly 0 where not ok

    return mass(s_first, first_ok), mass(s_self, key_ok), mass(s_prev, prev_ok)


def finish_pooled(bin_sums: jax.Array, pool: int, length: int) -> jax.Array:
    """(B, N, P, P) block means from per-key row-bin sums (B, N, P', Tp), P' >= P."""
    acc = bin_sums.dtype
    key_bins = jax.nn.one_hot(pool_bins(length, pool), pool, dtype=acc)  # (T, P)
    sums = jnp.einsum("BNAS,SC->BNAC", bin_sums[:, :, :pool, :length], key_bins,
                      precision=lax.Precision.HIGHEST)  # (B, N, P, P)
    counts = jnp.sum(key_bins, axis=0)  # (P,); queries and keys share the bins
    cells = (counts[:, None] * counts[None, :])[None, None]  # (1, 1, P, P)
    return jnp.where(cells > 0, sums / jnp.maximum(cells, 1.0), 0.0)  # (B, N, P, P)


def assemble_stats(qh, kh, mask, *, causal, scale, length, pool, lse, entropy, max_prob,
                   argmax, mean_distance, received, bin_sums) -> AttentionStats:
    """AttentionStats from a kernel's padded rows (B, N, Tp) and column sums.

    Computes the diagonal masses and the pooled map; slices the padding off.
    """
    first_mass, self_mass, prev_mass = diagonal_masses(
        qh, kh, lse, mask, causal=causal, scale=scale, length=length)  # (B, N, T) each
    pooled = None if pool is None else finish_pooled(bin_sums, pool, length)  # (B, N, P, P)
    return AttentionStats(
        lse=lse[:, :, :length],
        entropy=entropy[:, :, :length],
        max_prob=max_prob[:, :, :length],
        argmax=argmax[:, :, :length].astype(jnp.int32),
        first_mass=first_mass,
        self_mass=self_mass,
        prev_mass=prev_mass,
        mean_distance=mean_distance[:, :, :length],
        received=received[:, :, :length],
        pooled=pooled,
    )
