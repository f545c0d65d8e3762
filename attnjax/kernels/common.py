"""Helpers the blockwise and Pallas kernels share: padding, row validity, the
diagonal masses, pooled maps, assembling ``AttentionStats``, and the custom_vjp
wiring of a FlashAttention forward with its backward (``flash_function``).

Every function that depends on which keys a query sees takes the call's
``AttentionSpec`` (causal, window, softcap, GQA groups), so the rule lives in
``attnjax.kernels.spec`` and nowhere else.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

from attnjax.kernels.reference import MASK_VALUE, accumulation_dtype, pool_bins
from attnjax.kernels.spec import AttentionSpec, cap_scores
from attnjax.kernels.stats import AttentionStats

# Initial running max of the online softmax: finite, and far above MASK_VALUE, so
# exp(MASK_VALUE - m) is exactly 0 even for a row that has seen no visible key yet.
M_INIT = 0.5 * MASK_VALUE


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


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


def rows_with_keys(mask: Optional[jax.Array], batch: int, length: int, spec: AttentionSpec) -> jax.Array:
    """(B, T) bool: whether query i has at least one visible key.

    Without a key mask every query sees at least itself (causal or windowed) or every
    key. With one: any real key at all; under causal any real key j <= i; with a
    window any real key in (i - W, i], counted from a prefix sum.
    """
    if mask is None:
        return jnp.ones((batch, length), dtype=bool)  # (B, T)
    if not spec.causal:
        return jnp.broadcast_to(jnp.any(mask.astype(bool), axis=1, keepdims=True), (batch, length))  # (B, T)
    seen = jnp.cumsum(mask.astype(jnp.int32), axis=1)  # (B, T): real keys at or before i
    if spec.window is None or spec.window >= length:
        return seen > 0  # (B, T)
    before_window = jnp.pad(seen, ((0, 0), (spec.window, 0)))[:, :length]  # (B, T): real keys at or before i - W
    return seen - before_window > 0  # (B, T)


def diagonal_masses(q, k, lse, key_ok, row_valid, spec: AttentionSpec):
    """first_mass, self_mass, prev_mass (..., T): ``exp(s_ij - lse_i)`` at key 0, i, i - 1.

    q: (..., T, H) one query head per leading index; k: (..., T, H) with leading dims
    broadcastable to q's (under GQA a query group shares one kv head: q (.., G, T, H)
    against k (.., 1, T, H)). lse: q's leading dims + (T,). key_ok (visible keys) and
    row_valid (queries with any visible key): bool, broadcastable to lse.

    Causality never hides key 0, key i or key i - 1; a window of W hides key 0 from
    queries i >= W and key i - 1 when W = 1. Scores are soft-capped like the kernel's.
    Query 0 has no previous key.
    """
    acc = accumulation_dtype(q.dtype)
    q, k = q.astype(acc), k.astype(acc)  # (..., T, H)
    length = q.shape[-2]
    highest = lax.Precision.HIGHEST  # row-wise dots as einsums (faster than sum(q * k) on XLA:CPU)
    s_first = jnp.einsum("...TH,...H->...T", q, k[..., 0, :], precision=highest) * spec.scale  # (..., T)
    s_self = jnp.einsum("...TH,...TH->...T", q, k, precision=highest) * spec.scale  # (..., T)
    s_prev = jnp.einsum("...TH,...TH->...T", q[..., 1:, :], k[..., :-1, :], precision=highest) * spec.scale  # (..., T - 1)
    shift = [(0, 0)] * (s_prev.ndim - 1) + [(1, 0)]
    s_prev = jnp.pad(s_prev, shift)  # (..., T)
    first_ok = jnp.broadcast_to(key_ok[..., :1], key_ok.shape)  # (..., T)
    prev_ok = jnp.pad(key_ok[..., :-1], [(0, 0)] * (key_ok.ndim - 1) + [(1, 0)])  # (..., T)
    if spec.window is not None:
        position = jnp.arange(length).reshape((1,) * (first_ok.ndim - 1) + (length,))  # (1, ..., 1, T)
        first_ok = first_ok & (position < spec.window)  # (..., T)
        prev_ok = prev_ok & (spec.window >= 2)  # (..., T)

    def mass(score, ok):
        score = cap_scores(score, spec.softcap)  # (..., T)
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


def grouped(x: jax.Array, groups: int) -> jax.Array:
    """(B, Hq, ...) -> (B, Hkv, G, ...): query heads of one kv head side by side
    (query head h = kv * G + g, transformers' repeat_kv order)."""
    return x.reshape((x.shape[0], x.shape[1] // groups, groups) + x.shape[2:])


def assemble_stats(qh, kh, mask, spec: AttentionSpec, *, length, lse, entropy, max_prob,
                   argmax, mean_distance, received, bin_sums) -> AttentionStats:
    """AttentionStats from a kernel's padded rows (B, Hq, Tp) and column sums.

    qh: (B, Hq, Tp, H) and kh: (B, Hkv, Tp, H) heads-major inputs. Computes the
    diagonal masses and the pooled map; slices the padding off.
    """
    batch, heads = qh.shape[:2]
    key_ok = padded_key_mask(mask, batch, length, length)[:, None, None, :]  # (B, 1, 1, T)
    row_valid = rows_with_keys(mask, batch, length, spec)[:, None, None, :]  # (B, 1, 1, T)
    masses = diagonal_masses(
        grouped(qh[:, :, :length], spec.groups), kh[:, :, None, :length],
        grouped(lse[:, :, :length], spec.groups), key_ok, row_valid, spec)  # (B, Hkv, G, T) each
    first_mass, self_mass, prev_mass = (m.reshape(batch, heads, length) for m in masses)  # (B, Hq, T) each
    pooled = None if spec.pool is None else finish_pooled(bin_sums, spec.pool, length)  # (B, Hq, P, P)
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


def flash_function(forward: Callable, backward: Callable) -> Callable:
    """One ``jax.custom_vjp`` function ``flash(q, k, v, key_mask, cfg) -> (out, rows)``
    from a kernel family's forward and FlashAttention-2 backward.

    ``forward(q, k, v, key_mask, cfg) -> (out, rows)``: rows is a tuple of per-query
    arrays whose first entry is the natural-log LSE (the rest are statistics, which
    carry no gradient). ``backward(q, k, v, key_mask, out, lse, d_out, cfg) -> (dq, dk,
    dv)`` recomputes p from the saved LSE. ``cfg`` is static and hashable (a
    nondiff argument); ``key_mask`` gets no cotangent. The arrays may be in any layout
    the two functions agree on (blockwise: (B, T, N, H); Pallas: heads-major, padded).
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def flash(q, k, v, key_mask, cfg):
        return forward(q, k, v, key_mask, cfg)

    def flash_fwd(q, k, v, key_mask, cfg):
        out, rows = forward(q, k, v, key_mask, cfg)
        return (out, rows), (q, k, v, key_mask, out, rows[0])

    def flash_bwd(cfg, residuals, cotangents):
        q, k, v, key_mask, out, lse = residuals
        d_out, _ = cotangents  # the rows are statistics: no gradient flows through them
        dq, dk, dv = backward(q, k, v, key_mask, out, lse, d_out, cfg)
        return dq, dk, dv, None

    flash.defvjp(flash_fwd, flash_bwd)
    return flash
