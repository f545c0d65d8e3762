"""What the blockwise passes share: the static config, walking (batch, kv head)
groups of the (B, T, N, H) inputs, and the scores and visibility of one tile.

Layout of a step: one batch element and ``block_heads`` kv heads, each with the G
query heads that read it (G = Hq / Hkv, ``spec.groups``). Query-side arrays are
(c, G, Tp, ...) and key-side ones (c, Tp, ...), c = block_heads; a score tile is
(c, G, bq, bk): the G query heads of one kv head meet that kv head's single K/V
block in one batched matmul (einsum ``CGQH,CKH->CGQK``), so K and V are never
repeated. Multi-head attention is G = 1.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax import lax

from attnjax.kernels.reference import MASK_VALUE
from attnjax.kernels.spec import AttentionSpec, cap_scores, positions_visible
# int32 zero for dynamic-slice origins (a Python 0 becomes int64 under jax_enable_x64).
I0 = np.int32(0)


@dataclasses.dataclass(frozen=True)
class Config:
    """Static description of one blockwise call (hashable: a custom_vjp nondiff arg).

    spec:        the normalised call (scale, causal, window, softcap, groups, stats, pool);
    block_q/k:   tile sizes (query rows per query head, keys);
    block_heads: kv heads per step (divides Hkv), each with its G query heads;
    length:      real sequence length T; ``padded`` Tp is T rounded up to both tiles.
    """

    spec: AttentionSpec
    block_q: int
    block_k: int
    block_heads: int
    length: int
    padded: int

    @property
    def num_query_blocks(self) -> int:
        """Query blocks that hold a real query (later ones are all padding)."""
        return -(-self.length // self.block_q)

    @property
    def num_key_blocks(self) -> int:
        """Key blocks that hold a real key."""
        return -(-self.length // self.block_k)


# --------------------------------------------------------------------------- walking groups of heads


def num_steps(batch: int, kv_heads: int, cfg: Config) -> int:
    return batch * (kv_heads // cfg.block_heads)


def group_origin(step, kv_heads: int, cfg: Config):
    """(batch index, first kv head) of scan step ``step``: batch-major, then kv-head chunks."""
    chunks = kv_heads // cfg.block_heads
    return step // chunks, (step % chunks) * cfg.block_heads


def take_queries(x, b, kv0, cfg: Config):
    """(B, T, Hq, H) -> (c, G, Tp, H): the query heads of kv heads kv0 .. kv0 + c of
    batch b, zero-padded along the sequence."""
    _, length, _, head_dim = x.shape
    c, groups = cfg.block_heads, cfg.spec.groups
    block = lax.dynamic_slice(x, (b, I0, kv0 * groups, I0), (1, length, c * groups, head_dim))[0]  # (T, cG, H)
    block = jnp.swapaxes(block, 0, 1).reshape(c, groups, length, head_dim)  # (c, G, T, H)
    return jnp.pad(block, ((0, 0), (0, 0), (0, cfg.padded - length), (0, 0)))  # (c, G, Tp, H)


def take_keys(x, b, kv0, cfg: Config):
    """(B, T, Hkv, H) -> (c, Tp, H): kv heads kv0 .. kv0 + c of batch b, zero-padded."""
    _, length, _, head_dim = x.shape
    block = lax.dynamic_slice(x, (b, I0, kv0, I0), (1, length, cfg.block_heads, head_dim))[0]  # (T, c, H)
    block = jnp.swapaxes(block, 0, 1)  # (c, T, H)
    return jnp.pad(block, ((0, 0), (0, cfg.padded - length), (0, 0)))  # (c, Tp, H)


def put_queries(buffer, value, b, kv0):
    """Write a group's (c, G, Tp, H) query-side rows into the (B, T, Hq, H) buffer."""
    length = buffer.shape[1]
    c, groups, _, head_dim = value.shape
    value = value[:, :, :length].reshape(c * groups, length, head_dim)  # (cG, T, H)
    value = jnp.swapaxes(value, 0, 1)[None]  # (1, T, cG, H)
    return lax.dynamic_update_slice(buffer, value.astype(buffer.dtype), (b, I0, kv0 * groups, I0))  # (B, T, Hq, H)


def put_keys(buffer, value, b, kv0):
    """Write a group's (c, Tp, H) key-side rows into the (B, T, Hkv, H) buffer."""
    length = buffer.shape[1]
    value = jnp.swapaxes(value[:, :length], 0, 1)[None]  # (1, T, c, H)
    return lax.dynamic_update_slice(buffer, value.astype(buffer.dtype), (b, I0, kv0, I0))  # (B, T, Hkv, H)


def take_rows(x, b, kv0, cfg: Config):
    """(B, Hq, Tp) -> (c, G, Tp): per-query rows of the group's query heads."""
    c, groups = cfg.block_heads, cfg.spec.groups
    rows = lax.dynamic_slice(x, (b, kv0 * groups, I0), (1, c * groups, x.shape[2]))[0]  # (cG, Tp)
    return rows.reshape(c, groups, x.shape[2])  # (c, G, Tp)


def stack_rows(rows, batch: int, heads: int):
    """Scan outputs (S, c, G, ...) -> (B, Hq, ...) (steps are batch-major, then kv
    chunks; query head = kv head * G + g)."""
    return rows.reshape((batch, heads) + rows.shape[3:])


def group_key_visible(key_mask, b, cfg: Config):
    """(c, Tp) bool: the real, unmasked keys of batch b, for each kv head of the group."""
    return jnp.broadcast_to(key_mask[b], (cfg.block_heads, cfg.padded))  # (c, Tp)


# --------------------------------------------------------------------------- one tile


def tile_scores(q_blk, k_blk, spec: AttentionSpec, precision):
    """(c, G, bq, bk) scores ``scale * q.k`` of a query block against a key block,
    soft-capped when the spec has a cap. q_blk: (c, G, bq, H); k_blk: (c, bk, H)."""
    s = jnp.einsum("CGQH,CKH->CGQK", q_blk, k_blk, precision=precision) * spec.scale  # (c, G, bq, bk)
    return cap_scores(s, spec.softcap)  # (c, G, bq, bk)


def tile_visible(key_blk, key_pos, query_pos, spec: AttentionSpec, edge: bool = True):
    """(c, 1, bq | 1, bk) bool: key mask (c, bk) and, on an edge tile, the positional
    rule (causal, window) between query positions (bq,) and key positions (bk,).
    Interior tiles (``key_tile_segments``) need the key mask alone."""
    visible = key_blk[:, None, None, :]  # (c, 1, 1, bk)
    if not edge:
        return visible
    positional = positions_visible(query_pos[:, None], key_pos[None, :], spec.causal, spec.window)  # (bq, bk)
    if positional is not None:
        visible = visible & positional[None, None]  # (c, 1, bq, bk)
    return visible


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run [start, end) of key tiles one query block visits, and what they need.

    edge: some (query, key) pair of a tile is hidden by position (the diagonal, the
          window's far end), so the positional mask applies; otherwise the key mask
          alone (which also hides sequence padding) does.
    side: where the tile's keys lie relative to every query of the block: "before"
          (every key <= every query), "after" (every key >= every query), or
          "across" (neither: the tile straddles the diagonal). Sums of
          p |i - k| need the elementwise distance only "across".
    """

    start: object
    end: object
    edge: bool
    side: str


def key_tile_segments(first_query, last_query, lower, upper, cfg: Config):
    """The key tiles [lower, upper) a query block first_query..last_query visits, as
    consecutive ``Segment`` runs (some possibly empty), in key order.

    Under causal: [lower, a) at the window's far edge (masked, before the queries),
    [a, b) interior (key mask only, before), [b, upper) at the diagonal (masked,
    across), with b the first tile whose last key passes first_query. Without
    causal (no positional rule): tiles before, across and after the block.
    FlashAttention-2 masks only the diagonal tiles in the same way.
    """
    spec, bk = cfg.spec, cfg.block_k
    before_end = jnp.clip((first_query + 1) // bk, lower, upper)  # tiles whose keys are all <= first_query
    if spec.causal:
        window_end = lower
        if spec.window is not None:  # keys j > last_query - W are inside every query's window
            first_inside = -(-jnp.maximum(last_query - spec.window + 1, 0) // bk)
            window_end = jnp.clip(first_inside, lower, before_end)
        return (Segment(lower, window_end, True, "before"), Segment(window_end, before_end, False, "before"),
                Segment(before_end, upper, True, "across"))
    after_start = jnp.clip(-(-last_query // bk), before_end, upper)  # tiles whose keys are all >= last_query
    return (Segment(lower, before_end, False, "before"), Segment(before_end, after_start, False, "across"),
            Segment(after_start, upper, False, "after"))


def masked_scores(s, visible):
    """Scores with MASK_VALUE at invisible keys."""
    return jnp.where(visible, s, MASK_VALUE)
