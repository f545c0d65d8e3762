"""XLA blockwise attention with online softmax and streaming statistics (any backend).

(batch, head) pairs are walked ``block_heads`` at a time (``lax.scan``; one by
default, which keeps a tile in cache on CPU): each step slices its heads out of the
(B, T, N, H) inputs and writes its output rows back in place, so no transposed copy
of q, k, v is made. Within a group the forward pass walks query blocks
(``lax.map``) and, inside each, key blocks (``lax.fori_loop``), keeping the
FlashAttention running max ``m``, normaliser ``l`` and output accumulator per query
(Dao et al. 2022; Milakov & Gimelshein 2018). Memory is O(T): one
(block_heads, block_q, block_k) tile of scores at a time, never the T x T matrix.
Under ``causal`` the key loop stops at the diagonal.

Row statistics ride along in the same loop, rescaled exactly like ``l``:

- entropy: with ``E = sum_k exp(s_k - m) (s_k - m)``, the row entropy is
  ``log l - E / l`` (H = lse - sum_k p_k s_k, rearranged to avoid cancellation);
  when the running max moves from m to m', ``E' = c (E + (m - m') l)`` with
  ``c = exp(m - m')``;
- max_prob = ``exp(m - lse) = 1 / l``;
- argmax: the first key reaching the block max, kept when a later block's max is
  strictly larger (so the first maximum wins ties);
- mean_distance: ``sum_k exp(s_k - m) |i - k|``, rescaled by ``c``, divided by ``l``.

Masking: invisible scores are set to MASK_VALUE and the running max starts at
``M_INIT = MASK_VALUE / 2``, so their ``exp(s - m)`` is exactly 0; a row with no
visible key ends with ``l = 0`` and gets zeros. Weighted row sums are einsums:
XLA:CPU reduces ``sum(a * b)`` of two tiles over ten times slower than the dot.

``first_mass``, ``self_mass`` and ``prev_mass`` are single entries of each row:
they are read at the end of a group's pass as ``exp(s_ij - lse_i)`` from one q.k
product per query (O(T H), ``diagonal_masses``). ``received`` and ``pooled`` need
the finished LSE, so a second pass walks key blocks and recomputes
``p = exp(s - lse)`` tile by tile (``_column_group``); the pooled map is reduced to
its P x P sums inside the group, so no (P, T) array outlives a step.

Gradients come from a ``jax.custom_vjp`` with the FlashAttention-2 backward
(recompute p from the saved LSE; ``dS = P * (dP - rowsum(dO * O))``), also O(T)
memory. The statistics carry no gradient (they pass through ``lax.stop_gradient``).

The helpers at the bottom (padding, row validity, diagonal masses, pooled maps,
assembling ``AttentionStats``) are shared with the Pallas path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnjax.kernels.reference import (
    MASK_VALUE,
    accumulation_dtype,
    default_scale,
    matmul_precision,
    pool_bins,
)
from attnjax.kernels.spec import AttentionSpec, normalize
from attnjax.kernels.stats import AttentionStats

# Key position used as "no candidate" when searching a block for its first maximum.
_NO_POSITION = float(2 ** 30)
_MAX_LENGTH = 2 ** 24  # float32 holds every key position exactly below this
# Initial running max: finite, and far above MASK_VALUE, so exp(MASK_VALUE - m) is
# exactly 0 even for a row that has seen no visible key yet (no second mask needed).
M_INIT = 0.5 * MASK_VALUE
# int32 zero for dynamic-slice origins (a Python 0 becomes int64 under jax_enable_x64).
_I0 = np.int32(0)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the XLA blockwise kernel.

    block_q x block_k scores per step, for block_heads heads of one batch element at
    once (rounded down to a divisor of the head count). Each step holds a few
    (block_heads, block_q, block_k) tiles in the accumulation dtype. On CPU one head
    at a time with 512 x 512 tiles (1 MiB) keeps the elementwise work in cache and
    was fastest on a 2-core machine (benchmarks/long_context.py); on an accelerator
    raise block_heads.
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
    block_heads: int  # divides the head count
    length: int       # real sequence length T
    padded: int       # Tp: T rounded up to a multiple of both blocks
    stats: bool       # also compute the row statistics in the forward loop


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _visible(key_vis, key_pos, query_pos, causal: bool):
    """(g, bq, bk) or (g, 1, bk) bool: key mask (g, bk) and, under causal, k <= i."""
    visible = key_vis[:, None, :]  # (g, 1, bk)
    if causal:
        lower = key_pos[None, :] <= query_pos[:, None]  # (bq, bk)
        visible = visible & lower[None]  # (g, bq, bk)
    return visible


# --------------------------------------------------------------------------- walking groups of heads


def _group_origin(step, heads: int, block_heads: int):
    """(batch index, first head) of scan step ``step``: batch-major, then head chunks."""
    chunks = heads // block_heads
    return step // chunks, (step % chunks) * block_heads


def _take_group(x, b, n0, block_heads: int, padded: int):
    """(B, T, N, H) -> (g, Tp, H): heads n0 .. n0 + g of batch b, zero-padded."""
    _, length, _, head_dim = x.shape
    block = lax.dynamic_slice(x, (b, _I0, n0, _I0), (1, length, block_heads, head_dim))[0]  # (T, g, H)
    block = jnp.swapaxes(block, 0, 1)  # (g, T, H)
    return jnp.pad(block, ((0, 0), (0, padded - length), (0, 0)))  # (g, Tp, H)


def _put_group(buffer, value, b, n0):
    """Write a group's (g, Tp, H) rows into the (B, T, N, H) buffer at (b, n0)."""
    length = buffer.shape[1]
    value = jnp.swapaxes(value[:, :length], 0, 1)[None]  # (1, T, g, H)
    return lax.dynamic_update_slice(buffer, value.astype(buffer.dtype), (b, _I0, n0, _I0))  # (B, T, N, H)


def _take_rows(x, b, n0, block_heads: int):
    """(B, N, Tp) -> (g, Tp) rows of heads n0 .. n0 + g of batch b."""
    return lax.dynamic_slice(x, (b, n0, _I0), (1, block_heads, x.shape[2]))[0]  # (g, Tp)


def _stack_rows(rows, batch: int, heads: int):
    """Scan outputs (S, g, ...) -> (B, N, ...) (steps are batch-major, then head chunks)."""
    return rows.reshape((batch, heads) + rows.shape[2:])


# --------------------------------------------------------------------------- forward


def _forward_group(q, k, v, key_vis, cfg: _Config):
    """Online-softmax forward for g heads. q, k, v: (g, Tp, H); key_vis: (g, Tp) bool.

    Returns out (g, Tp, H) in q's dtype and per-query rows (g, Tp): (lse,) or, with
    ``cfg.stats``, (lse, entropy, max_prob, argmax, mean_distance, first_mass,
    self_mass, prev_mass).
    """
    groups, padded, head_dim = q.shape
    acc = accumulation_dtype(q.dtype)
    precision = matmul_precision(q.dtype)
    stats_precision = lax.Precision.HIGHEST  # sums of float32 p: no TF32 or bf16 passes
    bq, bk = cfg.block_q, cfg.block_k
    num_key_blocks = -(-cfg.length // bk)

    def query_block(iq):
        q_blk = lax.dynamic_slice_in_dim(q, iq * bq, bq, axis=1).astype(acc)  # (g, bq, H)
        query_pos = iq * bq + jnp.arange(bq, dtype=jnp.int32)  # (bq,)

        def step(j, carry):
            m, l, o, entropy_sum, distance_sum, argmax = carry
            k_blk = lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1).astype(acc)  # (g, bk, H)
            v_blk = lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1).astype(acc)  # (g, bk, H)
            key_blk = lax.dynamic_slice_in_dim(key_vis, j * bk, bk, axis=1)  # (g, bk)
            key_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)  # (bk,)
            visible = _visible(key_blk, key_pos, query_pos, cfg.causal)  # (g, bq | 1, bk)
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
                p_shifted = jnp.einsum("GQK,GQK->GQ", p, shifted, precision=stats_precision)  # (g, bq)
                entropy_sum = correction * (entropy_sum + (m - m_new) * l) + p_shifted  # (g, bq)
                distance = jnp.abs(query_pos[:, None] - key_pos[None, :]).astype(acc)  # (bq, bk)
                p_distance = jnp.einsum("GQK,QK->GQ", p, distance, precision=stats_precision)  # (g, bq)
                distance_sum = correction * distance_sum + p_distance  # (g, bq)
                # A masked score equals m_blk only when m_blk == MASK_VALUE < m: never kept.
                # The search runs on float32 positions (exact below 2^24; a float min
                # vectorises better on XLA:CPU than an int32 one).
                is_max = s == m_blk[..., None]  # (g, bq, bk)
                key_pos_f = key_pos.astype(jnp.float32)  # (bk,)
                first_max = jnp.min(jnp.where(is_max, key_pos_f, _NO_POSITION), axis=-1)  # (g, bq)
                argmax = jnp.where(m_blk > m, first_max.astype(jnp.int32), argmax)  # (g, bq)
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
    if cfg.stats:
        lse, max_prob = rows[0], rows[2]
        rows = rows + diagonal_masses(q, k, lse, key_vis, max_prob > 0, cfg.scale)  # + 3 x (g, Tp)
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


def _forward(q, k, v, key_mask, cfg: _Config):
    """q, k, v: (B, T, N, H); key_mask: (B, Tp). -> out (B, T, N, H), rows (B, N, Tp) each."""
    batch, _, heads, _ = q.shape
    g = cfg.block_heads

    def step(out, index):
        b, n0 = _group_origin(index, heads, g)
        q_g, k_g, v_g = (_take_group(x, b, n0, g, cfg.padded) for x in (q, k, v))  # (g, Tp, H) each
        key_vis = jnp.broadcast_to(key_mask[b], (g, cfg.padded))  # (g, Tp)
        out_g, rows = _forward_group(q_g, k_g, v_g, key_vis, cfg)
        return _put_group(out, out_g, b, n0), rows

    steps = jnp.arange(batch * (heads // g), dtype=jnp.int32)
    out, rows = lax.scan(step, jnp.zeros_like(q), steps)  # rows (S, g, Tp) each
    return out, tuple(_stack_rows(r, batch, heads) for r in rows)  # (B, N, Tp) each


# --------------------------------------------------------------------------- backward


def _backward_group(q, k, v, key_vis, out, lse, d_out, cfg: _Config):
    """FlashAttention-2 gradients in XLA loops for g heads; arrays (g, Tp, ...)."""
    groups, padded, head_dim = q.shape
    acc = accumulation_dtype(q.dtype)
    precision = matmul_precision(q.dtype)
    bq, bk = cfg.block_q, cfg.block_k
    num_query_blocks = -(-cfg.length // bq)
    delta = jnp.einsum("GTH,GTH->GT", out.astype(acc), d_out.astype(acc), precision=precision)  # (g, Tp)

    def key_block(dq, jk):
        k_blk = lax.dynamic_slice_in_dim(k, jk * bk, bk, axis=1).astype(acc)  # (g, bk, H)
        v_blk = lax.dynamic_slice_in_dim(v, jk * bk, bk, axis=1).astype(acc)  # (g, bk, H)
        key_blk = lax.dynamic_slice_in_dim(key_vis, jk * bk, bk, axis=1)  # (g, bk)
        key_pos = jk * bk + jnp.arange(bk, dtype=jnp.int32)  # (bk,)

        def step(i, carry):
            dk, dv, dq = carry
            q_blk = lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1).astype(acc)  # (g, bq, H)
            do_blk = lax.dynamic_slice_in_dim(d_out, i * bq, bq, axis=1).astype(acc)  # (g, bq, H)
            lse_blk = lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=1)  # (g, bq)
            delta_blk = lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=1)  # (g, bq)
            query_pos = i * bq + jnp.arange(bq, dtype=jnp.int32)  # (bq,)
            visible = _visible(key_blk, key_pos, query_pos, cfg.causal)  # (g, bq | 1, bk)
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
    return dq * cfg.scale, dk * cfg.scale, dv


def _backward(q, k, v, key_mask, out, lse, d_out, cfg: _Config):
    """dq, dk, dv (B, T, N, H) from the saved output and LSE (B, N, Tp)."""
    batch, _, heads, _ = q.shape
    g = cfg.block_heads

    def step(grads, index):
        b, n0 = _group_origin(index, heads, g)
        groups = [_take_group(x, b, n0, g, cfg.padded) for x in (q, k, v, out, d_out)]  # (g, Tp, H) each
        key_vis = jnp.broadcast_to(key_mask[b], (g, cfg.padded))  # (g, Tp)
        q_g, k_g, v_g, out_g, d_out_g = groups
        grads_g = _backward_group(q_g, k_g, v_g, key_vis, out_g, _take_rows(lse, b, n0, g), d_out_g, cfg)
        return tuple(_put_group(buffer, grad, b, n0) for buffer, grad in zip(grads, grads_g)), None

    steps = jnp.arange(batch * (heads // g), dtype=jnp.int32)
    grads, _ = lax.scan(step, (jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)), steps)
    return grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, key_mask, cfg: _Config):
    return _forward(q, k, v, key_mask, cfg)


def _flash_fwd(q, k, v, key_mask, cfg: _Config):
    out, rows = _forward(q, k, v, key_mask, cfg)
    return (out, rows), (q, k, v, key_mask, out, rows[0])


def _flash_bwd(cfg: _Config, residuals, cotangents):
    q, k, v, key_mask, out, lse = residuals
    d_out, _ = cotangents  # the rows are statistics: no gradient flows through them
    dq, dk, dv = _backward(q, k, v, key_mask, out, lse, d_out, cfg)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# --------------------------------------------------------------------------- second pass


def _column_group(q, k, key_vis, query_weight, lse, cfg: _Config, pool: Optional[int]):
    """Column sums of p = exp(s - lse) for g heads, recomputed tile by tile.

    q, k: (g, Tp, H); key_vis: (g, Tp) bool; query_weight: (Tp,) (1 at queries counted
    in ``received``); lse: (g, Tp). Returns received (g, Tp) and, with ``pool``, the
    pooled sums (g, P, P): cell (a, c) sums p_ik over queries i in bin a and keys k in
    bin c (else a placeholder (g,)).

    A query block of bq rows meets at most ``local_bins = (bq - 1) P // T + 2`` bins
    (bins are contiguous runs of T / P positions), so each tile is reduced with a
    (bq, local_bins) one-hot matmul and added at the block's first bin, instead of a
    (bq, P) one: at T = 16k, P = 64, bq = 512 that is 3 bins instead of 64.
    """
    groups, padded, head_dim = q.shape
    acc = accumulation_dtype(q.dtype)
    precision = matmul_precision(q.dtype)
    stats_precision = lax.Precision.HIGHEST  # sums of float32 p: no TF32 or bf16 passes
    bq, bk, length = cfg.block_q, cfg.block_k, cfg.length
    num_query_blocks = -(-length // bq)
    local_bins = 0 if pool is None else min(pool, (bq - 1) * pool // length + 2)

    def key_block(pooled, jk):
        k_blk = lax.dynamic_slice_in_dim(k, jk * bk, bk, axis=1).astype(acc)  # (g, bk, H)
        key_blk = lax.dynamic_slice_in_dim(key_vis, jk * bk, bk, axis=1)  # (g, bk)
        key_pos = jk * bk + jnp.arange(bk, dtype=jnp.int32)  # (bk,)

        def step(i, carry):
            received, bin_sums = carry
            q_blk = lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1).astype(acc)  # (g, bq, H)
            lse_blk = lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=1)  # (g, bq)
            weight_blk = lax.dynamic_slice_in_dim(query_weight, i * bq, bq, axis=0)  # (bq,)
            query_pos = i * bq + jnp.arange(bq, dtype=jnp.int32)  # (bq,)
            # Key-major tiles: the sums over queries then run along the minor axis
            # (a query-major p would be transposed in memory for them on XLA:CPU).
            visible = key_blk[:, :, None]  # (g, bk, 1)
            if cfg.causal:
                visible = visible & (key_pos[:, None] <= query_pos[None, :])[None]  # (g, bk, bq)
            s = jnp.einsum("GKH,GQH->GKQ", k_blk, q_blk, precision=precision) * cfg.scale  # (g, bk, bq)
            p = jnp.exp(jnp.where(visible, s - lse_blk[:, None, :], MASK_VALUE))  # (g, bk, bq)
            if pool is None:
                received = received + jnp.einsum("GKQ,Q->GK", p, weight_blk, precision=stats_precision)  # (g, bk)
                return received, bin_sums
            # One matmul for both: the block's local bin one-hot plus the query weights.
            bins = jnp.where(query_pos < length, query_pos * pool // length, -1)  # (bq,)
            first = jnp.clip(i * bq * pool // length, 0, pool - local_bins)  # first bin this block can meet
            local = jax.nn.one_hot(bins - first, local_bins, dtype=acc)  # (bq, L); padding rows 0
            weights = jnp.concatenate([local, weight_blk[:, None]], axis=1)  # (bq, L + 1)
            tile_sums = jnp.einsum("GKQ,QL->GKL", p, weights, precision=stats_precision)  # (g, bk, L + 1)
            received = received + tile_sums[:, :, local_bins]  # (g, bk)
            current = lax.dynamic_slice_in_dim(bin_sums, first, local_bins, axis=2)  # (g, bk, L)
            bin_sums = lax.dynamic_update_slice_in_dim(
                bin_sums, current + tile_sums[:, :, :local_bins], first, axis=2)  # (g, bk, P)
            return received, bin_sums

        received0 = jnp.zeros((groups, bk), acc)  # (g, bk)
        bin_sums0 = jnp.zeros((groups, bk, pool) if pool else (groups,), acc)  # (g, bk, P)
        lower_block = (jk * bk) // bq if cfg.causal else 0
        received, bin_sums = lax.fori_loop(lower_block, num_query_blocks, step, (received0, bin_sums0))
        if pool is not None:
            key_bins = jnp.where(key_pos < length, key_pos * pool // length, -1)  # (bk,)
            key_one_hot = jax.nn.one_hot(key_bins, pool, dtype=acc)  # (bk, P); padding rows 0
            pooled = pooled + jnp.einsum("GKA,KC->GAC", bin_sums, key_one_hot, precision=stats_precision)  # (g, P, P)
        return pooled, received

    pooled0 = jnp.zeros((groups, pool, pool) if pool else (groups,), acc)  # (g, P, P)
    pooled, received = lax.scan(key_block, pooled0, jnp.arange(padded // bk, dtype=jnp.int32))
    received = jnp.moveaxis(received, 0, 1).reshape(groups, padded)  # (g, Tp)
    return received, pooled


def _columns(q, k, key_mask, query_weight, lse, cfg: _Config, pool: Optional[int]):
    """received (B, N, Tp) and pooled sums (B, N, P, P) (or a placeholder) from (B, T, N, H) inputs."""
    batch, _, heads, _ = q.shape
    g = cfg.block_heads

    def step(carry, index):
        b, n0 = _group_origin(index, heads, g)
        q_g, k_g = (_take_group(x, b, n0, g, cfg.padded) for x in (q, k))  # (g, Tp, H) each
        key_vis = jnp.broadcast_to(key_mask[b], (g, cfg.padded))  # (g, Tp)
        return carry, _column_group(q_g, k_g, key_vis, query_weight[b], _take_rows(lse, b, n0, g), cfg, pool)

    steps = jnp.arange(batch * (heads // g), dtype=jnp.int32)
    _, (received, pooled) = lax.scan(step, None, steps)  # (S, g, Tp), (S, g, P, P)
    return _stack_rows(received, batch, heads), _stack_rows(pooled, batch, heads)


# --------------------------------------------------------------------------- entry point


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: Optional[jax.Array] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    window: Optional[int] = None,
    softcap: Optional[float] = None,
    stats: bool = False,
    pool: Optional[int] = None,
    block_sizes: Optional[BlockSizes] = None,
):
    """Blockwise attention in XLA, O(T) memory. Same contract as ``reference_attention``."""
    mask, spec = normalize(q, k, v, mask=mask, causal=causal, scale=scale, window=window,
                           softcap=softcap, stats=stats, pool=pool)
    return blockwise_core(q, k, v, mask, spec, block_sizes=block_sizes)


@functools.partial(jax.jit, static_argnames=("spec", "block_sizes"))
def blockwise_core(q, k, v, mask, spec: AttentionSpec, *, block_sizes: Optional[BlockSizes] = None):
    """The blockwise implementation of a validated call (``spec.normalize``).

    TEMPORARY: GQA repeats K/V and window/softcap run the reference; the blockwise
    kernels for them are being written.
    """
    if spec.window is not None or spec.softcap is not None:
        from attnjax.kernels.reference import reference_core
        result = reference_core(q, k, v, mask, spec)
        return result if not spec.stats else (result[0], lax.stop_gradient(result[1]))
    if spec.groups > 1:
        k = jnp.repeat(k, spec.groups, axis=2)
        v = jnp.repeat(v, spec.groups, axis=2)
    return _blockwise_mha(q, k, v, mask=mask, causal=spec.causal, scale=spec.scale, stats=spec.stats,
                          pool=spec.pool, block_sizes=block_sizes)


def _blockwise_mha(
    q, k, v, *, mask, causal, scale, stats, pool, block_sizes,
):
    """Blockwise attention in XLA, O(T) memory. Same contract as ``reference_attention``.

    q, k, v: (B, T, N, H); mask: (B, T) bool or None. Returns out (B, T, N, H), and
    with ``stats=True`` also ``AttentionStats`` (float32; float64 for float64 inputs).
    ``block_sizes`` are clipped to the (8-rounded) sequence length.
    """
    batch, length, heads, head_dim = q.shape
    if length >= _MAX_LENGTH:
        raise ValueError(f"blockwise_attention: seq {length} >= 2^24; key positions are float32 in the argmax search.")
    scale = default_scale(head_dim) if scale is None else float(scale)
    sizes = block_sizes or BlockSizes()
    block_q = min(sizes.block_q, round_up(length, 8))
    block_k = min(sizes.block_k, round_up(length, 8))
    padded = round_up(length, math.lcm(block_q, block_k))
    cfg = _Config(scale=scale, causal=causal, block_q=block_q, block_k=block_k,
                  block_heads=math.gcd(sizes.block_heads, heads), length=length, padded=padded,
                  stats=stats)

    key_mask = padded_key_mask(mask, batch, length, padded)  # (B, Tp)
    out, rows = _flash(q, k, v, key_mask, cfg)  # (B, T, N, H), rows (B, N, Tp) each
    if not stats:
        return out

    rows = tuple(lax.stop_gradient(r)[:, :, :length] for r in rows)  # (B, N, T) each
    lse, entropy, max_prob, argmax, mean_distance, first_mass, self_mass, prev_mass = rows
    query_weight = padded_query_weight(mask, batch, length, padded, accumulation_dtype(q.dtype))  # (B, Tp)
    lse_padded = jnp.pad(lse, ((0, 0), (0, 0), (0, padded - length)))  # (B, N, Tp)
    received, pooled_sums = _columns(lax.stop_gradient(q), lax.stop_gradient(k), key_mask,
                                     query_weight, lse_padded, cfg, pool)  # (B, N, Tp), (B, N, P, P)
    return out, AttentionStats(
        lse=lse, entropy=entropy, max_prob=max_prob, argmax=argmax.astype(jnp.int32),
        first_mass=first_mass, self_mass=self_mass, prev_mass=prev_mass,
        mean_distance=mean_distance, received=received[:, :, :length],
        pooled=None if pool is None else normalize_pooled(pooled_sums, pool, length),
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


def diagonal_masses(q, k, lse, key_ok, row_valid, scale: float):
    """first_mass, self_mass, prev_mass (..., T): ``exp(s_ij - lse_i)`` at key 0, i, i - 1.

    q, k: (..., T, H); lse: (..., T); key_ok (visible keys) and row_valid (queries with
    any visible key): bool, broadcastable to (..., T) with the same rank. Key 0, key i
    and key i - 1 are never hidden by causality, so only the key mask and row validity
    matter; query 0 has no previous key.
    """
    acc = accumulation_dtype(q.dtype)
    q, k = q.astype(acc), k.astype(acc)  # (..., T, H)
    # Row-wise dot products as einsums (faster than sum(q * k) on XLA:CPU).
    highest = lax.Precision.HIGHEST
    s_first = jnp.einsum("...TH,...H->...T", q, k[..., 0, :], precision=highest) * scale  # (..., T)
    s_self = jnp.einsum("...TH,...TH->...T", q, k, precision=highest) * scale  # (..., T)
    s_prev = jnp.einsum("...TH,...TH->...T", q[..., 1:, :], k[..., :-1, :], precision=highest) * scale  # (..., T - 1)
    shift = [(0, 0)] * (s_prev.ndim - 1) + [(1, 0)]
    s_prev = jnp.pad(s_prev, shift)  # (..., T)
    first_ok = jnp.broadcast_to(key_ok[..., :1], key_ok.shape)  # (..., T)
    prev_ok = jnp.pad(key_ok[..., :-1], shift)  # (..., T)

    def mass(score, ok):
        return jnp.exp(jnp.where(ok & row_valid, score - lse, MASK_VALUE))  # (..., T); 0 where not ok

    return mass(s_first, first_ok), mass(s_self, key_ok), mass(s_prev, prev_ok)


def normalize_pooled(sums: jax.Array, pool: int, length: int) -> jax.Array:
    """(B, N, P, P) block means from block sums: divide by the number of (query, key)
    pairs in each bin pair; empty bins (P > T) give 0."""
    counts = jnp.sum(jax.nn.one_hot(pool_bins(length, pool), pool, dtype=sums.dtype), axis=0)  # (P,)
    cells = (counts[:, None] * counts[None, :])[None, None]  # (1, 1, P, P)
    return jnp.where(cells > 0, sums / jnp.maximum(cells, 1.0), 0.0)  # (B, N, P, P)


def finish_pooled(bin_sums: jax.Array, pool: int, length: int) -> jax.Array:
    """(B, N, P, P) block means from per-key row-bin sums (B, N, P', Tp), P' >= P."""
    key_bins = jax.nn.one_hot(pool_bins(length, pool), pool, dtype=bin_sums.dtype)  # (T, P)
    sums = jnp.einsum("BNAS,SC->BNAC", bin_sums[:, :, :pool, :length], key_bins,
                      precision=lax.Precision.HIGHEST)  # (B, N, P, P)
    return normalize_pooled(sums, pool, length)


def assemble_stats(qh, kh, mask, *, causal, scale, length, pool, lse, entropy, max_prob,
                   argmax, mean_distance, received, bin_sums) -> AttentionStats:
    """AttentionStats from a kernel's padded rows (B, N, Tp) and column sums.

    qh, kh: (B, N, Tp, H) heads-major inputs. Computes the diagonal masses and the
    pooled map; slices the padding off.
    """
    batch = qh.shape[0]
    key_ok = padded_key_mask(mask, batch, length, length)[:, None, :]  # (B, 1, T)
    row_valid = rows_with_keys(mask, batch, length, causal)[:, None, :]  # (B, 1, T)
    first_mass, self_mass, prev_mass = diagonal_masses(
        qh[:, :, :length], kh[:, :, :length], lse[:, :, :length], key_ok, row_valid, scale)  # (B, N, T) each
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
