"""Pallas statistics pass over key blocks: ``received`` and the pooled map's row-bin sums.

Column statistics need each row's finished LSE, so they cannot ride in the forward
loop. One program per (key block, batch, query head) recomputes
``p = exp(s - lse)`` query block by query block (soft-capped scores, the same
visibility rule as the forward) and accumulates:

- ``received``: column sums of p over non-padding queries (query weight 1 at real
  tokens, 0 at padding);
- with ``pool``: ``bins @ p``, the (P', bk) sums of p over each query bin, one matmul
  of the one-hot bin matrix with the tile; ``common.finish_pooled`` later sums them
  over key bins and divides by the cell sizes.

Query head h reads the K block of kv head ``h // groups``. Only query blocks that can
see the key block are visited (``spec.query_block_range``): under causal from the
diagonal on, with a window of W up to the block of query ``last_key + W - 1``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from attnjax.kernels.pallas_common import (
    KernelConfig,
    dot,
    has_edges,
    interior_query_blocks,
    kv_head,
    masked,
    num_blocks,
    pallas_call,
    scores,
    visibility,
)
from attnjax.kernels.reference import accumulation_dtype, matmul_precision
from attnjax.kernels.spec import query_block_range


def _columns_kernel(q_ref, k_ref, lse_ref, kmask_ref, weight_ref, *refs, cfg: KernelConfig, pooled: bool):
    if pooled:
        bins_ref, received_ref, bin_sums_ref = refs
    else:
        bins_ref, bin_sums_ref = None, None
        (received_ref,) = refs
    spec = cfg.spec
    bq, bk = cfg.block_q, cfg.block_k
    acc = accumulation_dtype(q_ref.dtype)
    precision = matmul_precision(q_ref.dtype)
    first_key = pl.program_id(0) * bk
    k = k_ref[...]  # (bk, Dp)
    kmask_row = kmask_ref[...] if cfg.key_mask else None  # (1, bk)
    key_pos = first_key + lax.broadcasted_iota(jnp.int32, (1, bk), 1)  # (1, bk)

    def body(i, carry, edge):
        received, bin_sums = carry
        start = pl.multiple_of(i * bq, bq)
        q = q_ref[pl.ds(start, bq), :]  # (bq, Dp)
        lse = lse_ref[pl.ds(start, bq), :]  # (bq, 1)
        weight = weight_ref[pl.ds(start, bq), :]  # (bq, 1)
        query_pos = start + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)  # (bq, 1)
        visible = visibility(cfg, kmask_row, key_pos, query_pos, edge)  # (bq | 1, bk) or None
        s = masked(scores(q, k, spec, acc, precision) - lse, visible)  # (bq, bk)
        p = jnp.exp(s)  # (bq, bk); exactly 0 if invisible
        received = received + jnp.sum(p * weight, axis=0, keepdims=True)  # (1, bk)
        if pooled:
            bins = bins_ref[:, pl.ds(start, bq)]  # (P', bq)
            bin_sums = bin_sums + dot(bins, p, (1, 0), acc, lax.Precision.HIGHEST)  # (P', bk)
        return received, bin_sums

    received0 = jnp.zeros((1, bk), acc)  # (1, bk)
    bin_sums0 = jnp.zeros(bin_sums_ref.shape, acc) if pooled else jnp.zeros((1, bk), acc)
    last_key = first_key + bk - 1
    lower, upper = query_block_range(first_key, last_key, bq, num_blocks(cfg.length, bq),
                                     spec.causal, spec.window)
    # Only the edge tiles (diagonal, window's far end, padded keys) get the positional mask.
    interior_lower, interior_upper = interior_query_blocks(first_key, last_key, lower, upper, bq, cfg)
    front, back = has_edges(cfg)  # the forward's window edge is the columns' back edge
    carry = (received0, bin_sums0)
    if back:
        carry = lax.fori_loop(lower, interior_lower, functools.partial(body, edge=True), carry)
    carry = lax.fori_loop(interior_lower, interior_upper, functools.partial(body, edge=False), carry)
    if front:
        carry = lax.fori_loop(interior_upper, upper, functools.partial(body, edge=True), carry)
    received, bin_sums = carry
    received_ref[...] = received.astype(received_ref.dtype)
    if pooled:
        bin_sums_ref[...] = bin_sums.astype(bin_sums_ref.dtype)


def columns(q, k, kmask, query_weight, bins, lse, cfg: KernelConfig):
    """received (B, Hq, Tp) and row-bin sums (B, Hq, P', Tp) or None.

    q: (B, Hq, Tp, Dp); k: (B, Hkv, Tp, Dp); kmask: (B, 1, Tp) int32; query_weight:
    (B, Tp, 1); bins: (P', Tp) one-hot bin matrix or None; lse: (B, Hq, Tp).
    """
    batch, heads, padded, head_dim = q.shape
    acc = accumulation_dtype(q.dtype)
    bk, groups = cfg.block_k, cfg.spec.groups
    grid = (padded // bk, batch, heads)
    in_specs = [
        pl.BlockSpec((None, None, padded, head_dim), lambda j, b, h: (b, h, 0, 0)),  # q
        pl.BlockSpec((None, None, bk, head_dim), lambda j, b, h: (b, kv_head(h, groups), j, 0)),  # k
        pl.BlockSpec((None, None, padded, 1), lambda j, b, h: (b, h, 0, 0)),  # lse
        pl.BlockSpec((None, 1, bk), lambda j, b, h: (b, 0, j)),  # key mask
        pl.BlockSpec((None, padded, 1), lambda j, b, h: (b, 0, 0)),  # query weight
    ]
    args = [q, k, lse[..., None].astype(acc), kmask, query_weight]
    out_shape = [jax.ShapeDtypeStruct((batch, heads, 1, padded), acc)]
    out_specs = [pl.BlockSpec((None, None, 1, bk), lambda j, b, h: (b, h, 0, j))]
    pooled = bins is not None
    if pooled:
        width = bins.shape[0]
        in_specs.append(pl.BlockSpec((width, padded), lambda j, b, h: (0, 0)))
        args.append(bins)
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, width, padded), acc))
        out_specs.append(pl.BlockSpec((None, None, width, bk), lambda j, b, h: (b, h, 0, j)))
    outs = pallas_call(functools.partial(_columns_kernel, cfg=cfg, pooled=pooled), cfg,
                       grid=grid, in_specs=in_specs, out_specs=out_specs,
                       out_shape=out_shape, name="attnjax_columns")(*args)
    received = outs[0][:, :, 0]  # (B, Hq, Tp)
    return received, (outs[1] if pooled else None)
