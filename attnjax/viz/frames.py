"""Trace -> the long DataFrames the chart builders draw (data shaping, no metrics).

``attention_frame`` is the one input of the heatmap and the model overview:

====================  ========================================================
column                meaning
====================  ========================================================
layer, head           0-based model layer and head
query, key            token positions (0-based); for a pooled map, bin indices
weight                attention probability (pooled: mean over the bin pair)
query_token,          the token strings (categorical); for a pooled map a label
key_token             "start-end first-token" of the bin
====================  ========================================================

Padding positions are left out. A pooled frame carries
``frame.attrs["pooled"] = {"bins": P, "tokens": T}``; the charts print it.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from attnjax.trace import Trace
from attnjax.viz.common import visible_text

# One head drawn cell by cell: up to 256 x 256 = 65,536 rectangles.
HEATMAP_MAX_TOKENS = 256
# The whole model in one overview: up to a BERT-base-sized model (12 layers x 12
# heads) at 128 tokens, 2,359,296 weights = 2.4 MB of one-byte codes.
OVERVIEW_MAX_WEIGHTS = 12 * 12 * 128 * 128
# Truncate tokens on the axes to this many characters (the tooltip has them whole).
LABEL_CHARS = 12
# Temperatures of the next-token explorer's slider.
TEMPERATURES = tuple(np.round(np.arange(0.05, 2.0001, 0.05), 2))


def truncate(token: str, limit: int = LABEL_CHARS) -> str:
    """A token for an axis label: visible (no control characters), at most ``limit``
    characters, '…' marking a cut."""
    token = visible_text(token)
    return token if len(token) <= limit else token[: limit - 1] + "\u2026"


def sequence_tokens(trace: Trace, batch: int = 0) -> Tuple[np.ndarray, Tuple[str, ...]]:
    """(positions, tokens) of the non-padding tokens of sequence ``batch``."""
    if not 0 <= batch < trace.batch_size:
        raise ValueError(f"batch={batch} is out of range; the Trace holds {trace.batch_size} sequences.")
    positions = np.flatnonzero(np.asarray(trace.mask)[batch])                  # (n,)
    if trace.tokens is not None:
        tokens = tuple(trace.tokens[batch][int(p)] for p in positions)
    else:
        ids = np.asarray(trace.input_ids[batch])
        tokens = tuple(f"#{int(ids[p])}" for p in positions)
    return positions, tokens


def token_frame(trace: Trace, batch: int = 0) -> pd.DataFrame:
    """One row per non-padding token: position, token, label (truncated)."""
    positions, tokens = sequence_tokens(trace, batch)
    return pd.DataFrame({
        "position": positions.astype(np.int64),
        "token": list(tokens),
        "label": [truncate(t) for t in tokens],
    })


def full_token_count(trace: Trace, batch: int = 0) -> int:
    return int(np.asarray(trace.mask)[batch].sum())


def attention_frame(
    trace: Trace,
    *,
    batch: int = 0,
    layers: Optional[Sequence[int]] = None,
    heads: Optional[Sequence[int]] = None,
    max_tokens: Optional[int] = None,
) -> pd.DataFrame:
    """Long frame of attention weights (module docstring), full or pooled.

    Full maps come from ``trace.attention``. The pooled maps of the streaming
    statistics (``Capture(stats=True, pool=P)``) are used instead when the Trace
    has no attention, or when the sequence is longer than ``max_tokens``.
    """
    n_tokens = full_token_count(trace, batch)
    too_long = max_tokens is not None and n_tokens > max_tokens
    pooled = trace.stats.pooled if trace.stats is not None else None
    if trace.attention is not None and not too_long:
        return _full_frame(trace, batch, layers, heads)
    if pooled is not None:
        return _pooled_frame(trace, batch, layers, heads)
    if trace.attention is None:
        raise ValueError("This Trace holds no attention maps; run with Capture(attention=True) "
                         "or Capture(stats=True, pool=64) for pooled maps.")
    raise ValueError(f"The sequence has {n_tokens} tokens, over max_tokens={max_tokens}; run with "
                     f"Capture(stats=True, pool=64) for pooled maps, or pass max_tokens=None.")


def _select(trace: Trace, layers, heads, num_heads: int):
    recorded = list(trace.layers) or list(range(trace.attention.shape[0] if trace.attention is not None else 0))
    if layers is None:
        layer_rows = list(range(len(recorded)))
    else:
        missing = [l for l in layers if l not in recorded]
        if missing:
            raise ValueError(f"Layer(s) {missing} were not recorded; the Trace has layers {recorded}.")
        layer_rows = [recorded.index(l) for l in layers]
    head_ids = list(range(num_heads)) if heads is None else [int(h) for h in heads]
    bad = [h for h in head_ids if not 0 <= h < num_heads]
    if bad:
        raise ValueError(f"Head(s) {bad} out of range; the model has {num_heads} heads per layer.")
    return [recorded[r] for r in layer_rows], layer_rows, head_ids


def _long(maps: np.ndarray, layer_ids, head_ids, query_ids, key_ids, labels_q, labels_k) -> pd.DataFrame:
    """Flatten (L, H, Q, K) maps into the long frame."""
    n_layers, n_heads, n_q, n_k = maps.shape
    shape = maps.shape
    index = np.indices(shape, dtype=np.int32).reshape(4, -1)                  # (4, L*H*Q*K)
    frame = pd.DataFrame({
        "layer": np.asarray(layer_ids, dtype=np.int64)[index[0]],
        "head": np.asarray(head_ids, dtype=np.int64)[index[1]],
        "query": np.asarray(query_ids, dtype=np.int64)[index[2]],
        "key": np.asarray(key_ids, dtype=np.int64)[index[3]],
        "weight": maps.reshape(-1).astype(np.float32),
        "query_token": _categorical(labels_q, index[2]),
        "key_token": _categorical(labels_k, index[3]),
    })
    return frame


def _categorical(labels: Sequence[str], codes: np.ndarray) -> pd.Categorical:
    categories, inverse = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    return pd.Categorical.from_codes(inverse[codes], categories=list(categories))


def _full_frame(trace: Trace, batch, layers, heads) -> pd.DataFrame:
    positions, tokens = sequence_tokens(trace, batch)
    layer_ids, layer_rows, head_ids = _select(trace, layers, heads, trace.attention.shape[2])
    attention = np.asarray(trace.attention)[:, batch]  # (L, H, T, T); numpy indexing: a JAX one compiles per shape
    maps = attention[np.ix_(layer_rows, head_ids, positions, positions)]      # (L', H', n, n)
    return _long(maps, layer_ids, head_ids, positions, positions, tokens, tokens)


def pooled_labels(tokens: Sequence[str], seq_len: int, bins: int) -> Tuple[str, ...]:
    """Label of each bin t -> floor(t * P / T): 'start-end first-token'."""
    assignment = (np.arange(seq_len) * bins) // seq_len                        # (T,)
    labels = []
    for b in range(bins):
        members = np.flatnonzero(assignment == b)
        if members.size == 0:
            labels.append(f"(empty bin {b})")
            continue
        first = tokens[members[0]] if members[0] < len(tokens) else ""
        labels.append(f"{members[0]}\u2013{members[-1]} {first}")
    return tuple(labels)


def _pooled_frame(trace: Trace, batch, layers, heads) -> pd.DataFrame:
    pooled = np.asarray(trace.stats.pooled[:, batch])                         # (L, H, P, P)
    bins = pooled.shape[-1]
    layer_ids, layer_rows, head_ids = _select(trace, layers, heads, pooled.shape[1])
    maps = pooled[np.ix_(layer_rows, head_ids, range(bins), range(bins))]     # (L', H', P, P)
    seq_len = trace.seq_len
    all_tokens = trace.tokens[batch] if trace.tokens is not None else tuple(
        f"#{int(i)}" for i in np.asarray(trace.input_ids[batch]))
    labels = pooled_labels(all_tokens, seq_len, bins)
    # Bins that hold only padding (the tail of a shorter sequence in a batch) are left
    # out; a bin that mixes the last real tokens with padding stays.
    real = np.asarray(trace.mask)[batch].astype(bool)                         # (T,)
    assignment = (np.arange(seq_len) * bins) // seq_len                        # (T,)
    kept = np.unique(assignment[real])                                         # (P',)
    maps = maps[:, :, kept][:, :, :, kept]                                     # (L', H', P', P')
    labels = tuple(labels[b] for b in kept)
    frame = _long(maps, layer_ids, head_ids, kept, kept, labels, labels)
    frame.attrs["pooled"] = {"bins": int(bins), "tokens": int(full_token_count(trace, batch))}
    return frame


def maps_from_frame(frame: pd.DataFrame):
    """(maps (L, H, Q, K), layer ids, head ids, query ids, key ids, query labels, key labels)
    from a long attention frame; cells absent from the frame are 0."""
    needed = {"layer", "head", "query", "key", "weight"}
    missing = needed - set(frame.columns)
    if missing:
        raise ValueError(f"The attention frame lacks column(s) {sorted(missing)}; "
                         "build it with attnjax.viz.attention_frame(trace).")
    if frame.empty:
        raise ValueError("The attention frame is empty: nothing to draw.")
    axes = [_ids_and_inverse(frame[column].to_numpy()) for column in ("layer", "head", "query", "key")]
    maps = np.zeros(tuple(len(ids) for ids, _ in axes), dtype=np.float32)    # (L, H, Q, K)
    maps[tuple(inverse for _, inverse in axes)] = frame["weight"].to_numpy(dtype=np.float32)
    labels = []
    for column, (ids, inverse) in (("query_token", axes[2]), ("key_token", axes[3])):
        if column in frame.columns:
            first = np.zeros(len(ids), dtype=np.int64)
            first[inverse[::-1]] = np.arange(len(inverse))[::-1]              # first row of each id
            labels.append(tuple(str(v) for v in frame[column].to_numpy()[first]))
        else:
            labels.append(tuple(str(i) for i in ids))
    return maps, axes[0][0], axes[1][0], axes[2][0], axes[3][0], labels[0], labels[1]


def _ids_and_inverse(values: np.ndarray):
    """np.unique(values, return_inverse=True), in O(n) for small non-negative integers
    (layer, head and position ids; a sort of a 1.2M-row frame costs ~30 ms a column)."""
    if values.dtype.kind in "iu" and values.size:
        low, high = int(values.min()), int(values.max())
        if low >= 0 and high < 4 * values.size + 1024:
            present = np.zeros(high + 1, dtype=bool)
            present[values] = True
            ids = np.flatnonzero(present).astype(values.dtype)             # sorted, unique
            rank = np.cumsum(present) - 1                                   # id -> index
            return ids, rank[values]
    return np.unique(values, return_inverse=True)


def next_token_frames(
    logits: np.ndarray,
    decode: Callable[[int], str],
    *,
    k: int = 10,
    temperatures: Sequence[float] = TEMPERATURES,
) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """Top-k next tokens of one position's logits, and the softmax normalisers.

    logits: (vocab,) the model's output at the position whose successor is predicted.
    Returns (top, normalizers): ``top`` has rank, token_id, token, logit; ``normalizers``
    has temperature and log_normalizer = log sum_v exp(logit_v / temperature) over the
    whole vocabulary, so the browser recomputes exact probabilities
    p = exp(logit / t - log_normalizer(t)) for each slider value.
    """
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)               # (V,)
    if logits.size == 0:
        raise ValueError("The logits are empty.")
    k = min(int(k), logits.size)
    order = np.argsort(-logits, kind="stable")[:k]                         # (k,)
    top = pd.DataFrame({
        "rank": np.arange(1, k + 1),
        "token_id": order.astype(np.int64),
        "token": [decode(int(i)) for i in order],
        "logit": logits[order],
    })
    temps = np.asarray(temperatures, dtype=np.float64)                     # (S,)
    scaled = logits[None, :] / temps[:, None]                              # (S, V)
    peak = scaled.max(axis=1, keepdims=True)
    log_normalizer = peak[:, 0] + np.log(np.exp(scaled - peak).sum(axis=1))
    normalizers = pd.DataFrame({"temperature": temps, "log_normalizer": log_normalizer})
    return top, normalizers
