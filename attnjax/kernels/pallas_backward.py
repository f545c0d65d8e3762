"""Pallas backward kernels (FlashAttention-2): dq, and dk/dv, from the saved LSE.

Both recompute ``p = exp(s - lse)`` tile by tile (Dao 2023, Algorithm 2) with
``dS = P * (dP - rowsum(dO * O))``. Under a soft cap the chain rule adds
``d capped / d s = 1 - (capped / c)^2`` (``spec.softcap_grad``) before dS meets q or k.

- dq: one program per (query block, batch, query head), looping over the visible key
  blocks of kv head ``h // groups`` (``spec.key_block_range``).
- dk/dv: one program per (key block, batch, kv head). Its BlockSpecs hand it the G
  query heads of the group (q, dO, LSE, delta of heads h*G .. h*G + G - 1), and it
  loops over them and over the query blocks that can see its keys
  (``spec.query_block_range``), accumulating, so dk and dv come out per kv head,
  (B, Hkv, Tp, Dp), with no (B, Hq, ...) intermediate.
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
    kv_head,
    masked,
    num_blocks,
    pallas_call,
    scores,
    visibility,
)
from attnjax.kernels.reference import accumulation_dtype, matmul_precision
from attnjax.kernels.spec import key_block_range, query_block_range, softcap_grad


def _score_grad(q, k, v, do, lse, delta, visible, cfg: KernelConfig, acc, precision):
    """p and dS (gradient w.r.t. the raw, uncapped score) of one (bq, bk) tile."""
    capped = scores(q, k, cfg.spec, acc, precision)  # (bq, bk)
    p = jnp.exp(masked(capped - lse, visible))  # (bq, bk); exactly 0 if invisible
    dp = dot(do, v, (1, 1), acc, precision)  # (bq, bk)
    ds = p * (dp - delta)  # (bq, bk)
    cap_grad = softcap_grad(capped, cfg.spec.softcap)  # (bq, bk) or None
    return p, (ds if cap_grad is None else ds * cap_grad)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, kmask_ref, dq_ref, *, cfg: KernelConfig):
    spec = cfg.spec
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    acc = accumulation_dtype(q_ref.dtype)
    precision = matmul_precision(q_ref.dtype)
    first_query = pl.program_id(0) * bq
    q = q_ref[...]  # (bq, Dp)
    do = do_ref[...]  # (bq, Dp)
    lse = lse_ref[...]  # (bq, 1)
    delta = delta_ref[...]  # (bq, 1)
    query_pos = first_query + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)  # (bq, 1)

    def body(j, dq):
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]  # (bk, Dp)
        v = v_ref[pl.ds(start, bk), :]  # (bk, Dp)
        key_pos = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)  # (1, bk)
        kmask_row = kmask_ref[:, pl.ds(start, bk)] if cfg.key_mask else None  # (1, bk)
        visible = visibility(cfg, kmask_row, key_pos, query_pos)  # (bq | 1, bk) or None
        _, ds = _score_grad(q, k, v, do, lse, delta, visible, cfg, acc, precision)  # (bq, bk)
        return dq + dot(ds.astype(k.dtype), k, (1, 0), acc, precision)  # (bq, Dp)

    lower, upper = key_block_range(first_query, first_query + bq - 1, bk,
                                   num_blocks(cfg.length, bk), spec.causal, spec.window)
    dq = lax.fori_loop(lower, upper, body, jnp.zeros(dq_ref.shape, acc))  # (bq, Dp)
    dq_ref[...] = (dq * spec.scale).astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, kmask_ref, dk_ref, dv_ref, *,
                 cfg: KernelConfig):
    spec = cfg.spec
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    acc = accumulation_dtype(q_ref.dtype)
    precision = matmul_precision(q_ref.dtype)
    first_key = pl.program_id(0) * bk
    k = k_ref[...]  # (bk, Dp)
    v = v_ref[...]  # (bk, Dp)
    kmask_row = kmask_ref[...] if cfg.key_mask else None  # (1, bk)
    key_pos = first_key + lax.broadcasted_iota(jnp.int32, (1, bk), 1)  # (1, bk)
    lower, upper = query_block_range(first_key, first_key + bk - 1, bq,
                                     num_blocks(cfg.length, bq), spec.causal, spec.window)

    def query_head(g, carry):  # the group's query heads, h * G + g
        def body(i, carry):
            dk, dv = carry
            start = pl.multiple_of(i * bq, bq)
            q = q_ref[g, pl.ds(start, bq), :]  # (bq, Dp)
            do = do_ref[g, pl.ds(start, bq), :]  # (bq, Dp)
            lse = lse_ref[g, pl.ds(start, bq), :]  # (bq, 1)
            delta = delta_ref[g, pl.ds(start, bq), :]  # (bq, 1)
            query_pos = start + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)  # (bq, 1)
            visible = visibility(cfg, kmask_row, key_pos, query_pos)  # (bq | 1, bk) or None
            p, ds = _score_grad(q, k, v, do, lse, delta, visible, cfg, acc, precision)  # (bq, bk) x2
            dv = dv + dot(p.astype(do.dtype), do, (0, 0), acc, precision)  # (bk, Dp)
            dk = dk + dot(ds.astype(q.dtype), q, (0, 0), acc, precision)  # (bk, Dp)
            return dk, dv

        return lax.fori_loop(lower, upper, body, carry)

    zeros = jnp.zeros(dk_ref.shape, acc)  # (bk, Dp)
    dk, dv = lax.fori_loop(0, spec.groups, query_head, (zeros, zeros))
    dk_ref[...] = (dk * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, kmask, out, lse, d_out, cfg: KernelConfig):
    """dq (B, Hq, Tp, Dp) and dk, dv (B, Hkv, Tp, Dp) from the saved output and LSE.

    q, out, d_out: (B, Hq, Tp, Dp); k, v: (B, Hkv, Tp, Dp); lse: (B, Hq, Tp);
    kmask: (B, 1, Tp) int32.
    """
    batch, heads, padded, head_dim = q.shape
    kv_heads = k.shape[1]
    groups = cfg.spec.groups
    acc = accumulation_dtype(q.dtype)
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    delta = jnp.sum(out.astype(acc) * d_out.astype(acc), axis=-1, keepdims=True)  # (B, Hq, Tp, 1)
    lse = lse[..., None]  # (B, Hq, Tp, 1)
    d_out = d_out.astype(q.dtype)  # (B, Hq, Tp, Dp)

    def query_tile(width):  # a query block of query head h
        return pl.BlockSpec((None, None, bq, width), lambda i, b, h: (b, h, i, 0))

    def kv_whole():  # query head h's whole kv head
        return pl.BlockSpec((None, None, padded, head_dim), lambda i, b, h: (b, kv_head(h, groups), 0, 0))

    dq = pallas_call(
        functools.partial(_dq_kernel, cfg=cfg), cfg,
        grid=(padded // bq, batch, heads),
        in_specs=[query_tile(head_dim), kv_whole(), kv_whole(), query_tile(head_dim),
                  query_tile(1), query_tile(1),
                  pl.BlockSpec((None, 1, padded), lambda i, b, h: (b, 0, 0))],
        out_specs=query_tile(head_dim),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="attnjax_backward_dq",
    )(q, k, v, d_out, lse, delta, kmask)

    def group_whole(width):  # kv head h's G query heads, whole sequence
        return pl.BlockSpec((None, groups, padded, width), lambda j, b, h: (b, h, 0, 0))

    def key_tile():  # a key block of kv head h
        return pl.BlockSpec((None, None, bk, head_dim), lambda j, b, h: (b, h, j, 0))

    dk, dv = pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg), cfg,
        grid=(padded // bk, batch, kv_heads),
        in_specs=[group_whole(head_dim), key_tile(), key_tile(), group_whole(head_dim),
                  group_whole(1), group_whole(1),
                  pl.BlockSpec((None, 1, bk), lambda j, b, h: (b, 0, j))],
        out_specs=[key_tile(), key_tile()],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        name="attnjax_backward_dkdv",
    )(q, k, v, d_out, lse, delta, kmask)
    return dq, dk, dv
