"""Per-query quantities read off full attention maps, one sequence at a time.

Every analysis of full maps reduces each attention row to a few numbers. Doing that for
the whole (L, B, H, T, T) array at once is memory-bound and, on CPU, slow for the
reductions whose weights depend on the query (|i - k|, token-repeat selectors). So the
work runs under ``jax.lax.map`` over sequences: one sequence's (L, H, T, T) block stays
in cache while every quantity is read off it, and the query-dependent weighted sums are
one batched matmul (queries as the batch) instead of one pass each.

``map_sequences`` returns per-query arrays laid out (L, B, H, T), as the rest of
attnjax.analysis expects.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp


def visible_keys(mask: jax.Array, causal: bool) -> jax.Array:
    """(B, T, T) bool: key k is visible from query i (non-padding, and k <= i if causal)."""
    visible = mask[:, None, :]  # (B, 1, T)
    seq = mask.shape[1]
    if causal:
        visible = visible & jnp.tril(jnp.ones((seq, seq), bool))[None]  # (B, T, T)
    return jnp.broadcast_to(visible, (mask.shape[0], seq, seq))  # (B, T, T)




def earlier_matches(input_ids: jax.Array, mask: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Token-repeat selectors of Olsson et al. 2022 (as TransformerLens builds them).

    duplicate[b, i, k]: key k < i holds the same token as query i (both non-padding).
    induction[b, i, k]: key k - 1 is such an earlier occurrence, i.e. k is the token
    right after an earlier copy of the current token. Both (B, T, T) bool.
    """
    seq = input_ids.shape[1]
    same = input_ids[:, :, None] == input_ids[:, None, :]  # (B, T, T)
    earlier = jnp.tril(jnp.ones((seq, seq), bool), k=-1)[None]  # (1, T, T) k < i
    both = mask[:, :, None] & mask[:, None, :]  # (B, T, T)
    duplicate = same & earlier & both  # (B, T, T)
    shifted = jnp.pad(duplicate[:, :, :-1], ((0, 0), (0, 0), (1, 0)))  # (B, T, T) [i, k] = dup[i, k-1]
    induction = shifted & mask[:, None, :]  # (B, T, T)
    return duplicate, induction


def positions_distance(seq: int) -> jax.Array:
    """(T, T) float32 |i - k|."""
    position = jnp.arange(seq)
    return jnp.abs(position[:, None] - position[None, :]).astype(jnp.float32)  # (T, T)


def xlogx(probs: jax.Array) -> jax.Array:
    """p log p with 0 log 0 = 0 (natural log)."""
    safe = jnp.where(probs > 0, probs, 1.0)
    return jnp.where(probs > 0, probs * jnp.log(safe), 0.0)


# Added inside log(p + LOG_FLOOR): 0 log 0 = 0 without a select, and log p is exact for
# every p above ~1e-23 in float32 (LOG_FLOOR is below float32 rounding of such p).
LOG_FLOOR = 1e-30

# Channels of the weighted row sums: sum_k p_ik W[i, k, c] for each channel c.
CHANNELS = ("row_sum", "visible", "cls", "sep", "punctuation", "mean_distance", "duplicate", "induction")


def map_sequences(body: Callable, attention: jax.Array, *per_sequence) -> Dict[str, jax.Array]:
    """Run body(block (L, H, T, T), *args of that sequence) for every sequence.

    per_sequence arrays have the batch as their leading axis. body returns a dict of
    arrays with leading (L, H) axes, or scalars; the result stacks them as (L, B, H, ...)
    (scalars as (B,)).
    """
    def one(index):
        block = jax.lax.dynamic_index_in_dim(attention, index, axis=1, keepdims=False)  # (L, H, T, T)
        args = [jax.lax.dynamic_index_in_dim(a, index, axis=0, keepdims=False) for a in per_sequence]
        return body(block.astype(jnp.float32), *args)

    stacked = jax.lax.map(one, jnp.arange(attention.shape[1]))
    return {name: value if value.ndim == 1 else jnp.moveaxis(value, 0, 1) for name, value in stacked.items()}


def entropy(block: jax.Array) -> jax.Array:
    """-sum_k p log p over the last axis (nats)."""
    return -(block * jnp.log(block + LOG_FLOOR)).sum(-1)


def diagonals(block: jax.Array) -> tuple:
    """p[i, i], p[i, i-1] (0 at i = 0) and p[i, i+1] (0 at the last i), each (L, H, T)."""
    *lead, seq, _ = block.shape
    flat = block.reshape(*lead, seq * seq)  # (L, H, T*T)
    self_mass = flat[..., :: seq + 1]  # (L, H, T)
    below = jnp.pad(flat[..., seq :: seq + 1], ((0, 0), (0, 0), (1, 0)))  # (L, H, T)
    above = jnp.pad(flat[..., 1 :: seq + 1], ((0, 0), (0, 0), (0, 1)))  # (L, H, T)
    return self_mass, below, above


def _visible(mask: jax.Array, causal: bool) -> jax.Array:
    return visible_keys(mask[None], causal)[0]  # (T, T)


def row_checks(block: jax.Array, mask: jax.Array, causal: bool) -> Dict[str, jax.Array]:
    """Row sums and mass on invisible keys (L, H, T), and the smallest weight (scalar)."""
    visible = _visible(mask, causal)  # (T, T)
    row_sum = block.sum(-1)  # (L, H, T)
    seen = (block * visible[None, None].astype(block.dtype)).sum(-1)  # (L, H, T)
    query = mask[None, None, :]  # (1, 1, T)
    return {
        "row_sum": row_sum,
        "hidden": row_sum - seen,
        "lowest": jnp.where(query[..., None], block, 0.0).min(),
    }


def score_terms(block, mask, input_ids, classes, *, causal: bool) -> Dict[str, jax.Array]:
    """Every per-query quantity of head_scores for one sequence, plus row checks.

    block (L, H, T, T); mask, input_ids (T,); classes (T, 3) float32 ([CLS], [SEP],
    punctuation keys). Returns (L, H, T) arrays named after the score columns, plus
    ``top2`` (sum of the two largest weights), ``argmax`` (int32, first maximum),
    ``row_sum``, ``hidden`` (for validation) and the scalar ``lowest``.
    """
    num_layers, heads, seq, _ = block.shape
    visible = _visible(mask, causal)  # (T, T)
    n_visible = visible.sum(-1).astype(jnp.float32)  # (T,)
    duplicate, induction = earlier_matches(input_ids[None], mask[None])  # (1, T, T) each
    per_key = jnp.broadcast_to(classes[None], (seq, seq, 3))  # (Tq, Tk, 3)
    weights = jnp.concatenate([
        jnp.ones((seq, seq, 1), jnp.float32),
        visible[..., None].astype(jnp.float32),
        per_key,
        positions_distance(seq)[..., None],
        duplicate[0, ..., None].astype(jnp.float32),
        induction[0, ..., None].astype(jnp.float32),
    ], axis=-1)  # (Tq, Tk, C)
    by_query = jnp.transpose(block, (2, 0, 1, 3)).reshape(seq, num_layers * heads, seq)  # (Tq, L*H, Tk)
    sums = jnp.einsum("QNK,QKC->QNC", by_query, weights, precision=jax.lax.Precision.HIGHEST)  # (Tq, L*H, C)
    sums = jnp.transpose(sums.reshape(seq, num_layers, heads, len(CHANNELS)), (1, 2, 0, 3))  # (L, H, T, C)
    terms = {name: sums[..., index] for index, name in enumerate(CHANNELS)}
    row_entropy = entropy(block)  # (L, H, T)
    self_mass, below, above = diagonals(block)
    largest, top2, argmax = top_two(block)
    terms.update({
        "entropy": row_entropy,
        "normalized_entropy": row_entropy / jnp.log(jnp.maximum(n_visible, 2.0))[None, None, :],
        "max_weight": largest,
        "top2": top2,
        "argmax": argmax,
        "self": self_mass,
        "previous_token": below,
        "next_token": above,
        "first_token": block[..., 0],
        "hidden": terms["row_sum"] - terms.pop("visible"),
        "lowest": jnp.where(mask[None, None, :, None], block, 0.0).min(),
    })
    return terms


def top_two(block: jax.Array) -> tuple:
    """Largest weight, sum of the two largest, and argmax (first maximum) per row, (L, H, T) each."""
    seq = block.shape[-1]
    key = jnp.arange(seq, dtype=jnp.int32)[None, None, None, :]  # (1, 1, 1, Tk)
    largest = block.max(-1, keepdims=True)  # (L, H, T, 1)
    argmax = jnp.where(block == largest, key, seq).min(-1)  # (L, H, T) first maximum on ties
    second = jnp.where(key == argmax[..., None], -1.0, block).max(-1)  # (L, H, T)
    return largest[..., 0], largest[..., 0] + jnp.maximum(second, 0.0), argmax


@functools.partial(jax.jit, static_argnames=("causal",))
def attention_score_terms(attention, mask, input_ids, classes, *, causal: bool) -> Dict[str, jax.Array]:
    """score_terms for every sequence: (L, B, H, T) arrays, ``lowest`` (B,)."""
    body = functools.partial(score_terms, causal=causal)
    return map_sequences(body, attention, mask.astype(bool), input_ids, classes)


@functools.partial(jax.jit, static_argnames=("causal",))
def attention_row_checks(attention, mask, *, causal: bool) -> Dict[str, jax.Array]:
    """row_checks for every sequence: row_sum, hidden (L, B, H, T), lowest (B,)."""
    body = functools.partial(row_checks, causal=causal)
    return map_sequences(body, attention, mask.astype(bool))


def _head_mean_and_checks(block, mask, *, causal: bool) -> Dict[str, jax.Array]:
    terms = row_checks(block, mask, causal)
    terms["head_mean"] = block.mean(1)  # (L, T, T)
    return terms


@functools.partial(jax.jit, static_argnames=("causal",))
def attention_head_means(attention, mask, *, causal: bool) -> Dict[str, jax.Array]:
    """Heads-averaged maps ``head_mean`` (L, B, T, T) and row checks, in one pass."""
    body = functools.partial(_head_mean_and_checks, causal=causal)
    return map_sequences(body, attention, mask.astype(bool))


# Defaults of the per-query parameters of the anomaly scores (attnjax.analysis.anomalies).
CONCENTRATED_MASS = 0.9  # top-2 mass that makes a query concentrated
DECISIVE = 0.5           # max weight that makes a query's argmax count for jumping
LOCAL_WINDOW = 2         # |argmax - query| <= this is a local (positional) argmax


@functools.partial(jax.jit, static_argnames=("local_window",))
def anomaly_sums(max_weight, top2, argmax, mask, input_ids, special, *, local_window, concentrated_mass, decisive):
    """Sums over queries of the per-head anomaly scores (definitions: anomalies.py).

    max_weight, top2 (L, B, H, T) float32; argmax (L, B, H, T) int32; mask, input_ids
    (B, T); special (B, T) bool: [CLS]/[SEP] keys. Returns (L, H) sums ``jump``,
    ``concentrated`` (and its split ``on_first`` / ``on_special`` by where the argmax
    lands), and the scalar counts ``pairs`` and ``queries``.
    """
    mask = mask.astype(bool)
    seq = mask.shape[1]
    n_tokens = mask.sum(-1).astype(jnp.float32)  # (B,)
    position = jnp.arange(seq)
    duplicate, induction = earlier_matches(input_ids, mask)  # (B, T, T)
    content = duplicate | induction  # (B, T, T)
    sequence = jnp.arange(mask.shape[0])[None, :, None, None]  # (1, B, 1, 1)

    # explained[l, b, h, i]: query i's argmax is local, a sink, or content-following
    local = jnp.abs(argmax - position[None, None, None, :]) <= local_window  # (L, B, H, T)
    first = argmax == 0  # (L, B, H, T)
    on_special = special[sequence, argmax] & ~first  # (L, B, H, T)
    follows = content[sequence, position[None, None, None, :], argmax]  # (L, B, H, T)
    explained = local | first | on_special | follows  # (L, B, H, T)
    step = jnp.abs(argmax[..., 1:] - argmax[..., :-1]).astype(jnp.float32)  # (L, B, H, T-1)
    both = explained[..., 1:] & explained[..., :-1]  # (L, B, H, T-1)
    focused = max_weight >= decisive  # (L, B, H, T) the argmax means something
    counted = focused[..., 1:] & focused[..., :-1] & ~both  # (L, B, H, T-1)
    pair = (mask[:, 1:] & mask[:, :-1]).astype(jnp.float32)  # (B, T-1)
    jump = jnp.where(counted, step, 0.0) / jnp.maximum(n_tokens, 1.0)[None, :, None, None]  # (L, B, H, T-1)

    # the head's favourite key in each sequence: the argmax of most of its queries
    counts = jnp.zeros(argmax.shape, jnp.float32).at[  # (L, B, H, T) queries whose argmax is each key
        jnp.arange(argmax.shape[0])[:, None, None, None], sequence,
        jnp.arange(argmax.shape[2])[None, None, :, None], argmax,
    ].add(jnp.broadcast_to(mask[None, :, None, :], argmax.shape).astype(jnp.float32))
    modal = jnp.argmax(counts, axis=-1)[..., None]  # (L, B, H, 1)
    concentrated = (top2 >= concentrated_mass) & (first | on_special | (argmax == modal))  # (L, B, H, T)
    query = mask.astype(jnp.float32)  # (B, T)

    def per_head(selected):  # (L, B, H, T) bool -> (L, H)
        return jnp.einsum("LBHQ,BQ->LH", selected.astype(jnp.float32), query)

    return {
        "jump": jnp.einsum("LBHQ,BQ->LH", jump, pair),
        "pairs": pair.sum(),
        "concentrated": per_head(concentrated),
        "on_first": per_head(concentrated & first),
        "on_special": per_head(concentrated & on_special),
        "queries": query.sum(),
    }
