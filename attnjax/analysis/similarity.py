"""How alike the attention of two layers, or two heads, is.

Both compare attention row by row and average over non-padding queries (every query of
every sequence counted once), following Clark et al. 2019's head distance:

- metric="jsd": Jensen-Shannon divergence in nats,
  JS(p, q) = H((p + q) / 2) - (H(p) + H(q)) / 2, between 0 (identical rows) and ln 2
  (disjoint support). Lower is more alike.
- metric="cosine": cosine similarity of the two rows (as vectors over keys), between 0
  and 1 for attention. Higher is more alike.

layer_similarity compares layers' heads-averaged maps; head_similarity compares every
pair of heads across the model. With a stats-only Trace both fall back to the pooled
P x P maps (Capture(stats=True, pool=P)): a row becomes the mass a query bin puts on
each key bin, and query bins are weighted by their number of non-padding queries. That
is a coarse approximation, marked in the ``source`` column.
"""

from __future__ import annotations

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from attnjax.analysis._common import (
    TraceOrTraces,
    as_traces,
    has_attention,
    layer_ids,
    trace_windows,
    validate_attention,
)
from attnjax.analysis._terms import attention_head_means, xlogx
from attnjax.kernels.reference import pool_bins
from attnjax.trace import Trace

METRICS = ("jsd", "cosine")


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}.")


def _pair_stat(rows_a: jax.Array, rows_b: jax.Array, metric: str) -> jax.Array:
    """Per-row JS divergence or cosine similarity of two (..., K) stacks of distributions."""
    if metric == "jsd":
        entropy_a = -xlogx(rows_a).sum(-1)
        entropy_b = -xlogx(rows_b).sum(-1)
        entropy_mix = -xlogx(0.5 * (rows_a + rows_b)).sum(-1)
        return jnp.maximum(entropy_mix - 0.5 * (entropy_a + entropy_b), 0.0)
    dot = (rows_a * rows_b).sum(-1)
    norms = jnp.sqrt((rows_a * rows_a).sum(-1) * (rows_b * rows_b).sum(-1))
    return jnp.where(norms > 0, dot / jnp.where(norms > 0, norms, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=("metric",))
def _all_pairs(rows: jax.Array, weights: jax.Array, *, metric: str) -> jax.Array:
    """(N, N) weighted sums over queries of the row statistic between every pair of maps.

    rows (N, B, Q, K) distributions; weights (B, Q) query weights.
    """
    def against_all(one):  # (B, Q, K) -> (N,)
        stat = _pair_stat(one[None], rows, metric)  # (N, B, Q)
        return jnp.einsum("NBQ,BQ->N", stat, weights)

    return jax.lax.map(against_all, rows)  # (N, N)


def _layer_rows(trace: Trace) -> Tuple[jax.Array, jax.Array]:
    """Heads-averaged rows (L, B, Q, K) and query weights (B, Q) of one Trace."""
    if has_attention(trace):
        terms = attention_head_means(trace.attention, trace.mask, causal=trace.causal, windows=trace_windows(trace))
        validate_attention(trace, terms)
        return terms["head_mean"], trace.mask.astype(jnp.float32)
    rows, weights = _pooled_rows(trace)  # (L, B, H, P, P), (B, P)
    return rows.mean(2), weights


def _head_rows(trace: Trace) -> Tuple[jax.Array, jax.Array]:
    """Every head's rows (L * H, B, Q, K) and query weights (B, Q) of one Trace."""
    if has_attention(trace):
        validate_attention(trace)
        attention = trace.attention.astype(jnp.float32)
        num_layers, batch, heads, seq, _ = attention.shape
        rows = jnp.moveaxis(attention, 2, 1).reshape(num_layers * heads, batch, seq, seq)  # (L*H, B, T, T)
        return rows, trace.mask.astype(jnp.float32)
    rows, weights = _pooled_rows(trace)  # (L, B, H, P, P)
    num_layers, batch, heads, bins, _ = rows.shape
    return jnp.moveaxis(rows, 2, 1).reshape(num_layers * heads, batch, bins, bins), weights


def _pooled_rows(trace: Trace) -> Tuple[jax.Array, jax.Array]:
    pooled = trace.stats.pooled
    if pooled is None:
        raise ValueError(
            "Similarity needs attention maps: this Trace holds streaming stats without pooled "
            "maps. Run with Capture(attention=True), or Capture(stats=True, pool=P) for a "
            "coarse P x P approximation."
        )
    bins = pooled.shape[-1]
    seq = trace.seq_len
    key_bin = np.asarray(pool_bins(seq, bins))
    keys_per_bin = np.bincount(key_bin, minlength=bins).astype(np.float32)  # (P,)
    mass = pooled.astype(jnp.float32) * keys_per_bin[None, None, None, None, :]  # (L, B, H, P, P) mean mass per query on each key bin
    total = mass.sum(-1, keepdims=True)
    mass = jnp.where(total > 0, mass / jnp.where(total > 0, total, 1.0), 0.0)
    query_bin = jax.nn.one_hot(key_bin, bins, dtype=jnp.float32)  # (T, P)
    weights = trace.mask.astype(jnp.float32) @ query_bin  # (B, P) non-padding queries per bin
    return mass, weights


def _accumulate(traces, rows_of, metric):
    total, count = None, 0.0
    for item in traces:
        rows, weights = rows_of(item)
        sums = np.asarray(_all_pairs(rows, weights, metric=metric), np.float64)
        total = sums if total is None else total + sums
        count += float(np.asarray(weights).sum())
    return total / count


def layer_similarity(trace: TraceOrTraces, metric: str = "jsd") -> pd.DataFrame:
    """Similarity of every ordered pair of recorded layers (heads averaged), long form.

    Columns: layer_a (int), layer_b (int), metric (str), value (float: mean over
    non-padding queries of the metric between the two layers' rows; see module
    docstring for direction), source (str: "attention" or "pooled").
    One row per (layer_a, layer_b), diagonal included.
    """
    _check_metric(metric)
    traces = as_traces(trace)
    values = _accumulate(traces, _layer_rows, metric)  # (L, L)
    ids = np.asarray(layer_ids(traces[0]), np.int64)
    count = len(ids)
    return pd.DataFrame({
        "layer_a": np.repeat(ids, count),
        "layer_b": np.tile(ids, count),
        "metric": metric,
        "value": values.reshape(-1),
        "source": "attention" if has_attention(traces[0]) else "pooled",
    })


def head_similarity(trace: TraceOrTraces, metric: str = "jsd") -> pd.DataFrame:
    """Similarity of every ordered pair of heads across the model (Clark et al. 2019).

    Cost: (L * H)^2 row comparisons per query, each over T keys: for 144 heads at 128
    tokens about 3.4e8 terms per sequence (about a second per sequence on CPU).

    Columns: layer_a, head_a, layer_b, head_b (int), metric (str), value (float),
    source (str: "attention" or "pooled"). One row per ordered pair, diagonal included.
    """
    _check_metric(metric)
    traces = as_traces(trace)
    values = _accumulate(traces, _head_rows, metric)  # (L*H, L*H)
    ids = np.asarray(layer_ids(traces[0]), np.int64)
    heads = traces[0].num_heads
    layer_of = np.repeat(ids, heads)
    head_of = np.tile(np.arange(heads, dtype=np.int64), len(ids))
    count = len(layer_of)
    return pd.DataFrame({
        "layer_a": np.repeat(layer_of, count),
        "head_a": np.repeat(head_of, count),
        "layer_b": np.tile(layer_of, count),
        "head_b": np.tile(head_of, count),
        "metric": metric,
        "value": values.reshape(-1),
        "source": "attention" if has_attention(traces[0]) else "pooled",
    })
