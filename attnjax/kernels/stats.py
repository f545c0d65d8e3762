"""AttentionStats: the per-query and per-key attention statistics every kernel can emit.

The statistics are what people read off an attention map, computed without the
map itself. For one head, with p the softmax row of query i over keys k:

- ``lse``           log sum_k exp(s_ik), natural log, float32: the softmax normaliser;
- ``entropy``       -sum_k p_ik log p_ik in nats (Clark et al. 2019);
- ``max_prob``      max_k p_ik;
- ``argmax``        argmax_k p_ik (int32; the first maximum on ties);
- ``first_mass``    p_i0, mass on key 0 ([CLS] in BERT, the attention sink in GPT-2);
- ``self_mass``     p_ii;
- ``prev_mass``     p_i,i-1 (0 for i = 0), the previous-token selector of Clark et al.;
- ``mean_distance`` sum_k p_ik |i - k|;
- ``received``      per key: sum_i p_ik over (non-padding) queries, the column sum;
- ``pooled``        optional (P, P) block mean of the attention map: query and key
                    positions are split into P contiguous, near-equal bins
                    (bin of position t is floor(t * P / T)), and each cell holds the
                    mean of p over the (query, key) pairs in that bin pair.

Statistics are per query head: under grouped-query attention ``heads`` is the number
of query heads, and each head's map is the softmax of its own (soft-capped) scores
over the keys it sees (its kv head's keys, within the causal window).
Per-query arrays are (batch, heads, query); ``received`` is (batch, heads, key);
``pooled`` is (batch, heads, P, P) or None. A fully masked query row (e.g. a padding
query under a causal mask with no visible key) has every statistic 0, never NaN.
In a Trace, each array gains a leading ``layers`` axis.
"""

from __future__ import annotations

from typing import Optional

import jax
from flax import struct


@struct.dataclass
class AttentionStats:
    lse: jax.Array            # (B, H, Tq) float32
    entropy: jax.Array        # (B, H, Tq) float32, nats
    max_prob: jax.Array       # (B, H, Tq) float32
    argmax: jax.Array         # (B, H, Tq) int32
    first_mass: jax.Array     # (B, H, Tq) float32
    self_mass: jax.Array      # (B, H, Tq) float32
    prev_mass: jax.Array      # (B, H, Tq) float32
    mean_distance: jax.Array  # (B, H, Tq) float32
    received: jax.Array       # (B, H, Tk) float32
    pooled: Optional[jax.Array] = None  # (B, H, P, P) float32

    # Field names that are per query (B, H, Tq), in a fixed order.
    PER_QUERY = (
        "lse", "entropy", "max_prob", "argmax", "first_mass",
        "self_mass", "prev_mass", "mean_distance",
    )
