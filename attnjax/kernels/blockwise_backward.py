"""The blockwise backward pass: FlashAttention-2 gradients in XLA loops, O(T) memory.

p is recomputed from the saved LSE; ``dS = P * (dP - rowsum(dO * O))``, times
``1 - tanh^2 = 1 - (s_capped / c)^2`` under a soft cap (``spec.softcap_grad``).
Each step walks key blocks (``lax.scan``) and, inside each, the query blocks that
can see one of its keys (``spec.query_block_range``: causal and window skipping, so
a windowed layer costs O(T W)), accumulating dk, dv for the key block and dq in
place. Under GQA the G query heads of a kv head sit in one tile, so their
contributions to that kv head's dk and dv are summed by the tile's matmuls.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from attnjax.kernels.blockwise_common import (
    Config,
    group_key_visible,
    group_origin,
    masked_scores,
    num_steps,
    put_keys,
    put_queries,
    take_keys,
    take_queries,
    take_rows,
    tile_scores,
    tile_visible,
)
from attnjax.kernels.reference import accumulation_dtype, matmul_precision
from attnjax.kernels.spec import query_block_range, softcap_grad


def backward_group(q, k, v, key_vis, out, lse, d_out, cfg: Config):
    """Gradients for one step. q, out, d_out: (c, G, Tp, H); k, v: (c, Tp, H);
    key_vis: (c, Tp); lse: (c, G, Tp). Returns dq (c, G, Tp, H), dk, dv (c, Tp, H)."""
    c, groups, padded, head_dim = q.shape
    spec = cfg.spec
    acc = accumulation_dtype(q.dtype)
    precision = matmul_precision(q.dtype)
    bq, bk = cfg.block_q, cfg.block_k
    delta = jnp.einsum("CGTH,CGTH->CGT", out.astype(acc), d_out.astype(acc), precision=precision)  # (c, G, Tp)

    def key_block(dq, jk):
        k_blk = lax.dynamic_slice_in_dim(k, jk * bk, bk, axis=1).astype(acc)  # (c, bk, H)
        v_blk = lax.dynamic_slice_in_dim(v, jk * bk, bk, axis=1).astype(acc)  # (c, bk, H)
        key_blk = lax.dynamic_slice_in_dim(key_vis, jk * bk, bk, axis=1)  # (c, bk)
        key_pos = jk * bk + jnp.arange(bk, dtype=jnp.int32)  # (bk,)

        def step(i, carry):
            dk, dv, dq = carry
            q_blk = lax.dynamic_slice_in_dim(q, i * bq, bq, axis=2).astype(acc)  # (c, G, bq, H)
            do_blk = lax.dynamic_slice_in_dim(d_out, i * bq, bq, axis=2).astype(acc)  # (c, G, bq, H)
            lse_blk = lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=2)  # (c, G, bq)
            delta_blk = lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=2)  # (c, G, bq)
            query_pos = i * bq + jnp.arange(bq, dtype=jnp.int32)  # (bq,)
            visible = tile_visible(key_blk, key_pos, query_pos, spec)  # (c, 1, bq | 1, bk)
            s = tile_scores(q_blk, k_blk, spec, precision)  # (c, G, bq, bk), capped
            p = jnp.exp(masked_scores(s - lse_blk[..., None], visible))  # (c, G, bq, bk)
            dv = dv + jnp.einsum("CGQK,CGQH->CKH", p, do_blk, precision=precision)  # (c, bk, H)
            dp = jnp.einsum("CGQH,CKH->CGQK", do_blk, v_blk, precision=precision)  # (c, G, bq, bk)
            ds = p * (dp - delta_blk[..., None])  # (c, G, bq, bk): d loss / d capped score
            if spec.softcap is not None:
                ds = ds * softcap_grad(s, spec.softcap)  # (c, G, bq, bk): d loss / d scaled score
            dk = dk + jnp.einsum("CGQK,CGQH->CKH", ds, q_blk, precision=precision)  # (c, bk, H)
            dq_blk = lax.dynamic_slice_in_dim(dq, i * bq, bq, axis=2)  # (c, G, bq, H)
            dq_blk = dq_blk + jnp.einsum("CGQK,CKH->CGQH", ds, k_blk, precision=precision)  # (c, G, bq, H)
            dq = lax.dynamic_update_slice_in_dim(dq, dq_blk, i * bq, axis=2)  # (c, G, Tp, H)
            return dk, dv, dq

        lower, upper = query_block_range(jk * bk, jk * bk + bk - 1, bq, cfg.num_query_blocks,
                                         spec.causal, spec.window)
        zeros = jnp.zeros((c, bk, head_dim), acc)  # (c, bk, H)
        dk, dv, dq = lax.fori_loop(lower, upper, step, (zeros, zeros, dq))
        return dq, (dk, dv)

    dq0 = jnp.zeros((c, groups, padded, head_dim), acc)  # (c, G, Tp, H)
    dq, (dk, dv) = lax.scan(key_block, dq0, jnp.arange(padded // bk, dtype=jnp.int32))
    # dk, dv: (nk, c, bk, H)
    dk = jnp.moveaxis(dk, 0, 1).reshape(c, padded, head_dim)  # (c, Tp, H)
    dv = jnp.moveaxis(dv, 0, 1).reshape(c, padded, head_dim)  # (c, Tp, H)
    return dq * spec.scale, dk * spec.scale, dv


def backward(q, k, v, key_mask, out, lse, d_out, cfg: Config):
    """dq (B, T, Hq, H), dk, dv (B, T, Hkv, H) from the saved output and LSE (B, Hq, Tp)."""
    batch, _, heads, _ = q.shape
    kv_heads = k.shape[2]

    def step(grads, index):
        b, kv0 = group_origin(index, kv_heads, cfg)
        q_g, out_g, d_out_g = (take_queries(x, b, kv0, cfg) for x in (q, out, d_out))  # (c, G, Tp, H) each
        k_g, v_g = take_keys(k, b, kv0, cfg), take_keys(v, b, kv0, cfg)  # (c, Tp, H) each
        dq_g, dk_g, dv_g = backward_group(q_g, k_g, v_g, group_key_visible(key_mask, b, cfg), out_g,
                                          take_rows(lse, b, kv0, cfg), d_out_g, cfg)
        dq, dk, dv = grads
        return (put_queries(dq, dq_g, b, kv0), put_keys(dk, dk_g, b, kv0),
                put_keys(dv, dv_g, b, kv0)), None

    steps = jnp.arange(num_steps(batch, kv_heads, cfg), dtype=jnp.int32)
    grads, _ = lax.scan(step, (jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)), steps)
    return grads
