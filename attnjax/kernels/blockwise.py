"""XLA blockwise attention with online softmax and streaming statistics (any backend).

The entry point and tile sizes; one pass per file, as JAX's pallas/ops keep kernels:

- ``blockwise_forward``: online softmax (FlashAttention-2) with the row statistics
  (entropy, max_prob, argmax, mean_distance) rescaled like the normaliser, and the
  diagonal masses (first, self, previous key) read from the LSE at the end;
- ``blockwise_columns``: a second pass over key blocks for ``received`` and the
  pooled map, recomputing ``p = exp(s - lse)`` tile by tile;
- ``blockwise_backward``: the FlashAttention-2 backward through ``jax.custom_vjp``
  (``common.flash_function``), also O(T) memory.

Every pass walks (batch, kv head) groups, ``block_heads`` kv heads at a time
(``lax.scan``; one by default, which keeps a tile in cache on CPU): each step slices
its heads out of the (B, T, N, H) inputs and writes its rows back in place, so no
transposed copy of q, k, v is made. Under grouped-query attention a step holds one
kv head's K/V block and the G query heads that read it, stacked in one
(c, G, block_q, block_k) tile, so K and V are never repeated
(``blockwise_common``). Memory is O(T): a few tiles at a time, never the T x T
matrix. Causality and a sliding window skip the key blocks (forward) and query
blocks (columns, backward) outside the band (``spec.key_block_range`` /
``spec.query_block_range``), so a window of W costs O(T W). A soft cap
``c tanh(s / c)`` is applied to every recomputed tile before masking, and its
derivative in the backward. The statistics carry no gradient
(``lax.stop_gradient``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from attnjax.kernels.blockwise_backward import backward
from attnjax.kernels.blockwise_columns import columns
from attnjax.kernels.blockwise_common import Config
from attnjax.kernels.blockwise_forward import forward
from attnjax.kernels.common import (
    flash_function,
    normalize_pooled,
    padded_key_mask,
    padded_query_weight,
    round_up,
)
from attnjax.kernels.reference import accumulation_dtype
from attnjax.kernels.spec import AttentionSpec, keyword_entry
from attnjax.kernels.stats import AttentionStats

_MAX_LENGTH = 2 ** 24  # float32 holds every key position exactly below this (argmax search)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the XLA blockwise kernel.

    block_q x block_k scores per query head per step, for ``block_heads`` kv heads of
    one batch element at once (rounded down to a divisor of the kv-head count), each
    with its G = Hq / Hkv query heads: a step's tile is (block_heads, G, block_q,
    block_k) in the accumulation dtype (for multi-head attention G = 1 and
    block_heads counts heads). On CPU one kv head at a time with 512 x 512 tiles
    (1 MiB per query head) keeps the elementwise work in cache and was fastest on a
    2-core machine (benchmarks/long_context.py); on an accelerator raise block_heads.
    """

    block_q: int = 512
    block_k: int = 512
    block_heads: int = 1

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockSizes.{name}={value!r} must be a positive int.")


_flash = flash_function(forward, backward)


@functools.partial(jax.jit, static_argnames=("spec", "block_sizes"))
def blockwise_core(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array],
                   spec: AttentionSpec, *, block_sizes: Optional[BlockSizes] = None):
    """Blockwise attention on a normalised call (``spec.normalize``'s mask and spec).

    q: (B, T, Hq, H); k, v: (B, T, Hkv, H) with Hq = spec.groups * Hkv; mask: (B, T)
    bool or None. Returns out (B, T, Hq, H), and with ``spec.stats`` also
    ``AttentionStats`` (per query head; float32, float64 for float64 inputs).
    ``block_sizes`` are clipped to the (8-rounded) sequence length.
    """
    batch, length, heads, head_dim = q.shape
    if length >= _MAX_LENGTH:
        raise ValueError(f"blockwise_attention: seq {length} >= 2^24; key positions are float32 in the argmax search.")
    sizes = block_sizes or BlockSizes()
    block_q = min(sizes.block_q, round_up(length, 8))
    block_k = min(sizes.block_k, round_up(length, 8))
    cfg = Config(spec=spec, block_q=block_q, block_k=block_k,
                 block_heads=math.gcd(sizes.block_heads, k.shape[2]), length=length,
                 padded=round_up(length, math.lcm(block_q, block_k)))

    key_mask = padded_key_mask(mask, batch, length, cfg.padded)  # (B, Tp)
    out, rows = _flash(q, k, v, key_mask, cfg)  # (B, T, Hq, H), rows (B, Hq, Tp) each
    if not spec.stats:
        return out

    rows = tuple(lax.stop_gradient(r)[:, :, :length] for r in rows)  # (B, Hq, T) each
    lse, entropy, max_prob, argmax, mean_distance, first_mass, self_mass, prev_mass = rows
    query_weight = padded_query_weight(mask, batch, length, cfg.padded, accumulation_dtype(q.dtype))  # (B, Tp)
    lse_padded = jnp.pad(lse, ((0, 0), (0, 0), (0, cfg.padded - length)))  # (B, Hq, Tp)
    received, pooled_sums = columns(lax.stop_gradient(q), lax.stop_gradient(k), key_mask,
                                    query_weight, lse_padded, cfg)  # (B, Hq, Tp), (B, Hq, P, P)
    return out, AttentionStats(
        lse=lse, entropy=entropy, max_prob=max_prob, argmax=argmax.astype(jnp.int32),
        first_mass=first_mass, self_mass=self_mass, prev_mass=prev_mass,
        mean_distance=mean_distance, received=received[:, :, :length],
        pooled=None if spec.pool is None else normalize_pooled(pooled_sums, spec.pool, length),
    )


blockwise_attention = keyword_entry(blockwise_core, name="blockwise_attention", doc="""\
Blockwise attention in XLA, O(T) memory; the contract of ``attnjax.kernels.attention``.

q: (B, T, Hq, H); k, v: (B, T, Hkv, H) (Hkv divides Hq); mask: (B, T) or None.
Validates through ``spec.normalize`` and runs ``blockwise_core`` (``block_sizes``:
a ``BlockSizes``, default 512 x 512 tiles, one kv head per step).
""")
