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
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np


# Per recorded layer: None (full attention) or the sliding window W (attnjax.trace).
Windows = Tuple[Optional[int], ...]


def layer_windows(windows: Sequence[Optional[int]], num_layers: int) -> Windows:
    """One window per layer: () (no layer slides, e.g. BERT, GPT-2) -> (None,) * num_layers."""
    if not windows:
        return (None,) * num_layers
    if len(windows) != num_layers:
        raise ValueError(
            f"windows {tuple(windows)} has {len(windows)} entries for {num_layers} layers; give one "
            "per recorded layer (None for full attention), or () when no layer has a window."
        )
    return tuple(None if window is None else int(window) for window in windows)


def distinct_windows(windows: Windows) -> Tuple[Windows, np.ndarray]:
    """The distinct windows (in order of first use) and each layer's index into them (L,)."""
    distinct = tuple(dict.fromkeys(windows))
    return distinct, np.array([distinct.index(window) for window in windows], np.int32)


def _check_window(window: Optional[int], causal: bool) -> None:
    if window is not None and not causal:
        raise ValueError(
            f"A sliding window (window={window}) needs causal attention: query i sees keys "
            "i - W < k <= i. Set causal=True, or pass window=None."
        )


def visible_keys(mask: jax.Array, causal: bool, window: Optional[int] = None) -> jax.Array:
    """(B, T, T) bool: key k is visible from query i.

    Visible: k is non-padding, k <= i if causal, and i - W < k under a sliding window W
    (the W most recent keys, the query included: Mistral / Gemma 2 / Qwen2, as
    attnjax.kernels.spec; a window needs causal).
    """
    _check_window(window, causal)
    visible = mask[:, None, :]  # (B, 1, T)
    seq = mask.shape[1]
    if causal:
        position = jnp.arange(seq)
        back = position[:, None] - position[None, :]  # (T, T) i - k
        band = back >= 0 if window is None else (back >= 0) & (back < window)  # (T, T)
        visible = visible & band[None]  # (B, T, T)
    return jnp.broadcast_to(visible, (mask.shape[0], seq, seq))  # (B, T, T)


def visible_counts(mask: jax.Array, causal: bool, window: Optional[int] = None) -> jax.Array:
    """(B, T) int32: visible_keys(mask, causal, window).sum(-1), without the (T, T) array.

    A running count of non-padding keys, so it stays O(T) at long context (the
    streaming-statistics path never builds a T x T array).
    """
    _check_window(window, causal)
    keys = mask.astype(jnp.int32)  # (B, T)
    if not causal:
        return jnp.broadcast_to(keys.sum(-1, keepdims=True), keys.shape)  # (B, T)
    upto = jnp.cumsum(keys, axis=-1)  # (B, T) non-padding keys at positions <= i
    if window is None:
        return upto
    seq = keys.shape[1]
    before = jnp.pad(upto, ((0, 0), (window, 0)))[:, :seq]  # (B, T) ... at positions <= i - W
    return upto - before  # (B, T) ... at i - W < k <= i


def earlier_matches(input_ids: jax.Array, mask: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Token-repeat selectors of Olsson et al. 2022 (as TransformerLens builds them).

    duplicate[b, i, k]: key k < i holds the same token as query i (both non-padding).
    induction[b, i, k]: key k - 1 is such an earlier occurrence, i.e. k is the token
    right after an earlier copy of the current token. Both (B, T, T) bool.

    They ignore sliding windows: a key outside the query's window holds no attention
    (validate_attention checks), so the mass a row puts on them is the same with or
    without restricting them to the window. Windows change which queries are eligible
    (previous_occurrence, attnjax.analysis.scores.query_weights).
    """
    seq = input_ids.shape[1]
    same = input_ids[:, :, None] == input_ids[:, None, :]  # (B, T, T)
    earlier = jnp.tril(jnp.ones((seq, seq), bool), k=-1)[None]  # (1, T, T) k < i
    both = mask[:, :, None] & mask[:, None, :]  # (B, T, T)
    duplicate = same & earlier & both  # (B, T, T)
    shifted = jnp.pad(duplicate[:, :, :-1], ((0, 0), (0, 0), (1, 0)))  # (B, T, T) [i, k] = dup[i, k-1]
    induction = shifted & mask[:, None, :]  # (B, T, T)
    return duplicate, induction


def previous_occurrence(input_ids: jax.Array, mask: jax.Array) -> jax.Array:
    """(B, T) int32: the position of the latest earlier copy of each token, -1 if none.

    Copies count among non-padding positions only (padding positions get -1), as in
    earlier_matches: previous_occurrence[b, i] = max{k : duplicate[b, i, k]}. One sort
    per sequence, O(T log T), so it serves the streaming path at long context.
    """
    batch, seq = input_ids.shape
    position = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32)[None], (batch, seq))  # (B, T)
    padding = (~mask).astype(jnp.int32)  # (B, T)
    # sorted by (padding, token, position): copies of a token sit together, in position order
    _, token, order = jax.lax.sort((padding, input_ids.astype(jnp.int32), position), dimension=1, num_keys=3)  # (B, T) each
    real = jnp.take_along_axis(mask, order, axis=1)  # (B, T)
    repeat = (token[:, 1:] == token[:, :-1]) & real[:, 1:] & real[:, :-1]  # (B, T-1) same token as the one before
    earlier = jnp.where(repeat, order[:, :-1], -1)  # (B, T-1)
    rows = jnp.arange(batch)[:, None]  # (B, 1)
    return jnp.full((batch, seq), -1, jnp.int32).at[rows, order[:, 1:]].set(earlier)  # (B, T)


def follows_earlier(input_ids: jax.Array, mask: jax.Array, keys: jax.Array) -> jax.Array:
    """(L, B, H, T) bool: (duplicate | induction)[b, i, keys[l, b, h, i]] of earlier_matches.

    keys (L, B, H, T) int32, one key per query (an argmax); read off the token ids
    directly, without the (B, T, T) selectors.
    """
    seq = mask.shape[1]
    query = jnp.arange(seq)[None, None, None, :]  # (1, 1, 1, T)

    def at(per_key, index):  # per_key (B, T) read at index (L, B, H, T)
        return jnp.take_along_axis(jnp.broadcast_to(per_key[None, :, None, :], index.shape), index, axis=-1)

    token = input_ids[None, :, None, :]  # (1, B, 1, T) the query's token
    before = jnp.maximum(keys - 1, 0)  # (L, B, H, T)
    duplicate = (at(input_ids, keys) == token) & (keys < query) & at(mask, keys)  # (L, B, H, T)
    induction = (keys >= 1) & (at(input_ids, before) == token) & (before < query) & at(mask, before) & at(mask, keys)
    return mask[None, :, None, :] & (duplicate | induction)  # (L, B, H, T)


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

# Channels of the weighted row sums: sum_k p_ik W[i, k, c] for each channel c. After them
# come one "visible" channel per distinct window of the block's layers (score_terms).
CHANNELS = ("row_sum", "cls", "sep", "punctuation", "mean_distance", "duplicate", "induction")


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


def window_visibility(mask: jax.Array, causal: bool, windows: Windows) -> Tuple[jax.Array, np.ndarray]:
    """One sequence's visible keys under each distinct window: (D, T, T) bool, and each
    layer's index into them (L,) (distinct_windows)."""
    distinct, index = distinct_windows(windows)
    visible = jnp.stack([visible_keys(mask[None], causal, window)[0] for window in distinct])  # (D, T, T)
    return visible, index


def row_checks(block: jax.Array, mask: jax.Array, causal: bool, windows: Windows = ()) -> Dict[str, jax.Array]:
    """Row sums and mass on invisible keys (L, H, T), and the smallest weight (scalar).

    windows: each layer's sliding window (layer_windows; () for none): keys outside a
    layer's window count as invisible for that layer.
    """
    windows = layer_windows(windows, block.shape[0])
    distinct, index = window_visibility(mask, causal, windows)  # (D, T, T), (L,)
    visible = distinct[index].astype(block.dtype)  # (L, T, T)
    row_sum = block.sum(-1)  # (L, H, T)
    seen = jnp.einsum("LHQK,LQK->LHQ", block, visible, precision=jax.lax.Precision.HIGHEST)  # (L, H, T)
    query = mask[None, None, :]  # (1, 1, T)
    return {
        "row_sum": row_sum,
        "hidden": row_sum - seen,
        "lowest": jnp.where(query[..., None], block, 0.0).min(),
    }


def score_terms(block, mask, input_ids, classes, *, causal: bool, windows: Windows = ()) -> Dict[str, jax.Array]:
    """Every per-query quantity of head_scores for one sequence, plus row checks.

    block (L, H, T, T); mask, input_ids (T,); classes (T, 3) float32 ([CLS], [SEP],
    punctuation keys); windows: each layer's sliding window (() for none). Returns
    (L, H, T) arrays named after the score columns, plus ``top2`` (sum of the two largest
    weights), ``argmax`` (int32, first maximum), ``row_sum``, ``hidden`` (mass on keys
    the layer cannot see: padding, future, or outside its window; for validation) and
    the scalar ``lowest``. normalized_entropy divides by ln of the number of keys the
    query sees in that layer (its window included).
    """
    num_layers, heads, seq, _ = block.shape
    windows = layer_windows(windows, num_layers)
    visible, window_index = window_visibility(mask, causal, windows)  # (D, T, T), (L,)
    n_visible = visible.sum(-1).astype(jnp.float32)[window_index]  # (L, T)
    duplicate, induction = earlier_matches(input_ids[None], mask[None])  # (1, T, T) each
    per_key = jnp.broadcast_to(classes[None], (seq, seq, 3))  # (Tq, Tk, 3)
    weights = jnp.concatenate([
        jnp.ones((seq, seq, 1), jnp.float32),
        per_key,
        positions_distance(seq)[..., None],
        duplicate[0, ..., None].astype(jnp.float32),
        induction[0, ..., None].astype(jnp.float32),
        jnp.moveaxis(visible, 0, -1).astype(jnp.float32),  # (Tq, Tk, D)
    ], axis=-1)  # (Tq, Tk, C + D)
    by_query = jnp.transpose(block, (2, 0, 1, 3)).reshape(seq, num_layers * heads, seq)  # (Tq, L*H, Tk)
    sums = jnp.einsum("QNK,QKC->QNC", by_query, weights, precision=jax.lax.Precision.HIGHEST)  # (Tq, L*H, C + D)
    sums = jnp.transpose(sums.reshape(seq, num_layers, heads, weights.shape[-1]), (1, 2, 0, 3))  # (L, H, T, C + D)
    terms = {name: sums[..., index] for index, name in enumerate(CHANNELS)}
    channel = jnp.asarray(len(CHANNELS) + window_index)[:, None, None, None]  # (L, 1, 1, 1) the layer's window
    seen = jnp.take_along_axis(sums, channel, axis=-1)[..., 0]  # (L, H, T) mass on visible keys
    row_entropy = entropy(block)  # (L, H, T)
    self_mass, below, above = diagonals(block)
    largest, top2, argmax = top_two(block)
    terms.update({
        "entropy": row_entropy,
        "normalized_entropy": row_entropy / jnp.log(jnp.maximum(n_visible, 2.0))[:, None, :],
        "max_weight": largest,
        "top2": top2,
        "argmax": argmax,
        "self": self_mass,
        "previous_token": below,
        "next_token": above,
        "first_token": block[..., 0],
        "hidden": terms["row_sum"] - seen,
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


@functools.partial(jax.jit, static_argnames=("causal", "windows"))
def attention_score_terms(attention, mask, input_ids, classes, *, causal: bool, windows: Windows = ()) -> Dict[str, jax.Array]:
    """score_terms for every sequence: (L, B, H, T) arrays, ``lowest`` (B,)."""
    body = functools.partial(score_terms, causal=causal, windows=windows)
    return map_sequences(body, attention, mask.astype(bool), input_ids, classes)


@functools.partial(jax.jit, static_argnames=("causal", "windows"))
def attention_row_checks(attention, mask, *, causal: bool, windows: Windows = ()) -> Dict[str, jax.Array]:
    """row_checks for every sequence: row_sum, hidden (L, B, H, T), lowest (B,)."""
    body = functools.partial(row_checks, causal=causal, windows=windows)
    return map_sequences(body, attention, mask.astype(bool))


def _head_mean_and_checks(block, mask, *, causal: bool, windows: Windows) -> Dict[str, jax.Array]:
    terms = row_checks(block, mask, causal, windows)
    terms["head_mean"] = block.mean(1)  # (L, T, T)
    return terms


@functools.partial(jax.jit, static_argnames=("causal", "windows"))
def attention_head_means(attention, mask, *, causal: bool, windows: Windows = ()) -> Dict[str, jax.Array]:
    """Heads-averaged maps ``head_mean`` (L, B, T, T) and row checks, in one pass."""
    body = functools.partial(_head_mean_and_checks, causal=causal, windows=windows)
    return map_sequences(body, attention, mask.astype(bool))


# Defaults of the per-query parameters of the anomaly scores (attnjax.analysis.anomalies).
CONCENTRATED_MASS = 0.98  # top-2 mass that makes a query concentrated
DECISIVE = 0.5            # max weight that makes a query's argmax count for jumping
LOCAL_WINDOW = 2          # |argmax - query| <= this is a local (positional) argmax
# Shortest sequence (its span: tokens, or the layer's window W if smaller) whose queries
# count towards the concentrated / jump scores; shorter ones are "too short" for a
# verdict (measurements and the null behind them: anomalies.py, benchmarks/anomaly_rates.py).
MIN_TOKENS_CONCENTRATED = 12
MIN_TOKENS_JUMP = 16


@functools.partial(jax.jit, static_argnames=("local_window", "windows"))
def anomaly_sums(max_weight, top2, argmax, mask, input_ids, special, *, local_window, concentrated_mass, decisive,
                 windows: Windows = (), min_tokens_concentrated: int = 0, min_tokens_jump: int = 0):
    """Sums over queries of the per-head anomaly scores (definitions: anomalies.py).

    max_weight, top2 (L, B, H, T) float32; argmax (L, B, H, T) int32; mask, input_ids
    (B, T); special (B, T) bool: [CLS]/[SEP] keys; windows: each layer's sliding window
    (() for none), which bounds how far an argmax can move (jump's span).
    min_tokens_concentrated / min_tokens_jump: only sequences whose span (tokens, or W if
    smaller) reaches this count towards concentrated / jump ("too short" otherwise).
    Returns (L, H) sums ``jump``, ``concentrated`` (and its split ``on_first`` /
    ``on_special`` by where the argmax lands), and the (L,) counts of the queries and
    query pairs they sum over, ``queries`` and ``pairs``.
    """
    mask = mask.astype(bool)
    seq = mask.shape[1]
    windows = layer_windows(windows, argmax.shape[0])
    n_tokens = mask.sum(-1).astype(jnp.float32)  # (B,)
    reach = jnp.asarray([jnp.inf if window is None else float(window) for window in windows], jnp.float32)  # (L,)
    span = jnp.minimum(n_tokens[None, :], reach[:, None])  # (L, B) keys an argmax can range over
    position = jnp.arange(seq)
    sequence = jnp.arange(mask.shape[0])[None, :, None, None]  # (1, B, 1, 1)

    # explained[l, b, h, i]: query i's argmax is local, a sink, or content-following
    local = jnp.abs(argmax - position[None, None, None, :]) <= local_window  # (L, B, H, T)
    first = argmax == 0  # (L, B, H, T)
    on_special = special[sequence, argmax] & ~first  # (L, B, H, T)
    follows = follows_earlier(input_ids, mask, argmax)  # (L, B, H, T)
    explained = local | first | on_special | follows  # (L, B, H, T)
    step = jnp.abs(argmax[..., 1:] - argmax[..., :-1]).astype(jnp.float32)  # (L, B, H, T-1)
    both = explained[..., 1:] & explained[..., :-1]  # (L, B, H, T-1)
    focused = max_weight >= decisive  # (L, B, H, T) the argmax means something
    counted = focused[..., 1:] & focused[..., :-1] & ~both  # (L, B, H, T-1)
    long_jump = (span >= min_tokens_jump).astype(jnp.float32)  # (L, B) long enough to judge
    long_concentrated = (span >= min_tokens_concentrated).astype(jnp.float32)  # (L, B)
    pair = (mask[:, 1:] & mask[:, :-1]).astype(jnp.float32)[None] * long_jump[:, :, None]  # (L, B, T-1)
    jump = jnp.where(counted, step, 0.0) / jnp.maximum(span, 1.0)[:, :, None, None]  # (L, B, H, T-1)

    # the head's favourite key in each sequence: the argmax of most of its queries
    counts = jnp.zeros(argmax.shape, jnp.float32).at[  # (L, B, H, T) queries whose argmax is each key
        jnp.arange(argmax.shape[0])[:, None, None, None], sequence,
        jnp.arange(argmax.shape[2])[None, None, :, None], argmax,
    ].add(jnp.broadcast_to(mask[None, :, None, :], argmax.shape).astype(jnp.float32))
    modal = jnp.argmax(counts, axis=-1)[..., None]  # (L, B, H, 1)
    concentrated = (top2 >= concentrated_mass) & (first | on_special | (argmax == modal))  # (L, B, H, T)
    query = mask.astype(jnp.float32)[None] * long_concentrated[:, :, None]  # (L, B, T)

    def per_head(selected):  # (L, B, H, T) bool -> (L, H)
        return jnp.einsum("LBHQ,LBQ->LH", selected.astype(jnp.float32), query)

    return {
        "jump": jnp.einsum("LBHQ,LBQ->LH", jump, pair),
        "pairs": pair.sum((1, 2)),  # (L,)
        "concentrated": per_head(concentrated),
        "on_first": per_head(concentrated & first),
        "on_special": per_head(concentrated & on_special),
        "queries": query.sum((1, 2)),  # (L,)
    }
