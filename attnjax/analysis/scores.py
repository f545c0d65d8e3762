"""Per-head attention scores (Clark et al. 2019; Olsson et al. 2022), one row per head.

For head (l, h) and a non-padding query i of sequence b, p = attention[l, b, h, i, :]
is a distribution over the keys visible to i: non-padding keys; keys k <= i for causal
models; and, on a layer with a sliding window W (Trace.windows: Mistral, Gemma 2,
Qwen2/3), only i - W < k <= i. Every score is a mean over queries of a per-query
quantity; the mean runs over every eligible query of every sequence in the batch (or
corpus), each counted once:

==================  =========================================  ==============================
column              per-query quantity                         eligible queries
==================  =========================================  ==============================
entropy             -sum_k p_k ln p_k (nats; Clark et al.)     every non-padding query
normalized_entropy  entropy / ln(number of visible keys)       ... with at least 2 visible keys
max_weight          max_k p_k                                  every non-padding query
self                p_i                                        every non-padding query
previous_token      p_(i-1) (Clark's np.eye(n, n, -1))         i >= 1 with i - 1 non-padding
                                                               (and visible: W >= 2)
next_token          p_(i+1) (0 for causal models)              i + 1 exists and is non-padding
first_token         p_0 (key position 0: [CLS] / the sink)     every non-padding query that
                                                               sees position 0 (i < W)
cls                 sum of p over [CLS]-like keys              every non-padding query
sep                 sum of p over [SEP]-like keys              every non-padding query
punctuation         sum of p over "." and "," keys             every non-padding query
mean_distance       sum_k p_k |i - k| (tokens)                 every non-padding query
duplicate           sum of p over earlier k < i with the       queries with an earlier copy of
                    same token id (Olsson et al. 2022)         their token that they see
                                                               (at k > i - W)
induction           sum of p over keys k whose previous        queries with an earlier copy at
                    token k - 1 is an earlier occurrence of    k - 1 whose successor k they
                    the current token (Olsson et al. 2022;     see (k - 1 >= i - W; k - 1 itself
                    TransformerLens's induction diagonal)      may have left the window)
concentrated        1 if the two largest weights sum to >=     every non-padding query of a
                    0.98 and the argmax is a sink or the       sequence whose span is >= 12
                    head's favourite key (anomalies.py)        (NaN if none: too short)
jump                |argmax(i+1) - argmax(i)| / span for       adjacent pairs (i, i + 1) of
                    decisive, unexplained steps; span: the     non-padding queries of a
                    sequence's tokens, or W if smaller         sequence whose span is >= 16
                    (anomalies.py)                             (NaN if none: too short)
==================  =========================================  ==============================

Sliding windows (the parenthesised conditions, which hold for every query without a
window). A score measures how a head uses what it can see, so a query counts towards a
score only if the keys that score is about are visible to it in that layer: at long
context, a windowed layer's induction or sink score is the mean over the queries that
could attend to an earlier copy or to position 0, not diluted by the many that cannot.
The per-query quantities need no window: keys outside it hold no attention (checked by
validate_attention), so a sum over a key set is the same whether or not the set is cut
to the window. Without windows every condition reduces to the definitions of Clark et
al. and Olsson et al.

Chance baselines (the same for every head of a layer), the values a uniform row over
the visible keys would give, each a mean over non-padding queries; classify_heads
compares the mass scores with thresholds raised by them, so a short text is not
classified by chance mass (Clark et al.'s thresholds were set at 128 tokens):

==================  =========================================================
visible_keys        the number of keys the query sees (window-aware)
chance_key          1 / visible keys: the mass uniform attention puts on one key
                    (previous, next, self, position 0)
chance_cls / _sep   visible [CLS] / [SEP] / punctuation keys / visible keys
chance_punctuation
chance_distance     mean |i - k| over the visible keys (for mean_distance)
==================  =========================================================

cls / sep / punctuation are NaN when no key of that class occurs (e.g. GPT-2 has no
[CLS]); induction / duplicate are NaN when no token repeats (within reach). With a
stats-only Trace (Capture(stats=True), no T x T maps) entropy, normalized_entropy,
max_weight, self, previous_token, first_token and mean_distance come from the per-query
statistics, and cls / sep / punctuation from ``received`` (column sums over non-padding
queries: the mean mass on a key set is the sum of its received mass over the number of
queries); concentrated and jump use max_prob (the top weight only) and argmax;
next_token, induction and duplicate need the maps, or the recorded queries and keys:
with Capture(stats=True, qkv=True) they are recomputed tile by tile from q, k and the
statistics' lse (analysis._qk_terms: O(T) memory, no T x T matrix); with stats alone
they are NaN.
"""

from __future__ import annotations

import functools
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from attnjax.analysis._common import (
    CLS_TOKENS,
    PUNCTUATION_TOKENS,
    SEP_TOKENS,
    TraceOrTraces,
    as_traces,
    has_attention,
    layer_ids,
    token_classes,
    token_strings,
    trace_windows,
    validate_attention,
)
from attnjax.analysis._qk_terms import qk_match_terms
from attnjax.analysis._terms import (
    CONCENTRATED_MASS,
    DECISIVE,
    LOCAL_WINDOW,
    MIN_TOKENS_CONCENTRATED,
    MIN_TOKENS_JUMP,
    Windows,
    anomaly_sums,
    attention_score_terms,
    layer_windows,
    previous_occurrence,
    visible_counts,
)
from attnjax.trace import Trace

# Score columns of head_scores, in order (after `layer`, `head`, `n_queries`).
SCORE_COLUMNS: Tuple[str, ...] = (
    "entropy", "normalized_entropy", "max_weight", "self", "previous_token", "next_token",
    "first_token", "cls", "sep", "punctuation", "mean_distance", "induction", "duplicate",
    "concentrated", "jump",
)
# Columns the streaming statistics cannot give (NaN for stats-only Traces).
NEEDS_MAPS: Tuple[str, ...] = ("next_token", "induction", "duplicate")

# Chance baselines of each layer (module docstring), after `source`.
CHANCE_COLUMNS: Tuple[str, ...] = (
    "visible_keys", "chance_key", "chance_cls", "chance_sep", "chance_punctuation", "chance_distance",
)

# Which queries each score averages over (see the module docstring).
_ELIGIBLE = {
    "entropy": "query", "normalized_entropy": "spread", "max_weight": "query", "self": "query",
    "previous_token": "previous", "next_token": "next", "first_token": "first", "cls": "query",
    "sep": "query", "punctuation": "query", "mean_distance": "query", "induction": "repeat_successor",
    "duplicate": "repeat", "concentrated": "long_queries", "jump": "long_pairs",
}
# The eligible counts that anomaly_sums gives (only sequences long enough to judge), by its
# key; every other count is a sum of query_weights's selector of that name.
LONG_COUNTS = {"long_queries": "queries", "long_pairs": "pairs"}
# The (L, H) sums anomaly_sums adds besides the query_weights-weighted ones: the two scores
# and concentrated's split by where the argmax lands (concentrated_on).
ANOMALY_SUMS: Tuple[str, ...] = ("jump", "concentrated", "on_first", "on_special")
_CLASS_COLUMNS = ("cls", "sep", "punctuation")


def anomaly_parameters(concentrated_mass: float = CONCENTRATED_MASS, decisive: float = DECISIVE,
                       local_window: int = LOCAL_WINDOW, min_tokens_concentrated: int = MIN_TOKENS_CONCENTRATED,
                       min_tokens_jump: int = MIN_TOKENS_JUMP) -> Dict[str, float]:
    """The anomaly_sums parameters head_scores uses, as kept in frame.attrs["anomaly_parameters"]."""
    return {"concentrated_mass": float(concentrated_mass), "decisive": float(decisive),
            "local_window": int(local_window), "min_tokens_concentrated": int(min_tokens_concentrated),
            "min_tokens_jump": int(min_tokens_jump)}


def head_scores(
    trace: TraceOrTraces,
    *,
    cls_tokens: Sequence[str] = CLS_TOKENS,
    sep_tokens: Sequence[str] = SEP_TOKENS,
    punctuation: Sequence[str] = PUNCTUATION_TOKENS,
    concentrated_mass: float = CONCENTRATED_MASS,
    decisive: float = DECISIVE,
    local_window: int = LOCAL_WINDOW,
    min_tokens_concentrated: int = MIN_TOKENS_CONCENTRATED,
    min_tokens_jump: int = MIN_TOKENS_JUMP,
) -> pd.DataFrame:
    """One row per (layer, head) of attention scores averaged over queries.

    trace: a Trace, or a list of Traces from one model (a corpus); full attention
    (L, B, H, T, T) is used when present, else the streaming AttentionStats (plus, when
    the Trace holds queries and keys, next_token, duplicate and induction recomputed
    from them: Capture(stats=True, qkv=True)).

    Columns:
      layer (int, model layer index), head (int), n_queries (int: non-padding queries
      averaged over), then the floats of SCORE_COLUMNS defined in the module docstring:
      entropy, normalized_entropy, max_weight, self, previous_token, next_token,
      first_token, cls, sep, punctuation, mean_distance, induction, duplicate;
      concentrated and jump (float: the per-head anomaly scores of
      attnjax.analysis.anomalies, with the parameters concentrated_mass, decisive and
      local_window), concentrated_on (str: where the concentrated queries' argmax
      mostly lands: "position 0" (with its token when every sequence has the same
      one there, e.g. "position 0 '[CLS]'"), "[CLS]/[SEP]", "a fixed key", or "" when
      no query is concentrated); then source (str: "attention" or "stats", what the
      row was computed from). The parameters are kept in ``frame.attrs["anomaly_parameters"]``.

    Raises ValueError for an empty batch, or attention rows that are not distributions
    over the visible keys.
    """
    traces = as_traces(trace)
    parameters = anomaly_parameters(concentrated_mass, decisive, local_window, min_tokens_concentrated,
                                    min_tokens_jump)
    sums: Optional[Dict[str, np.ndarray]] = None
    counts: Optional[Dict[str, np.ndarray]] = None
    present = np.zeros(3, bool)
    first_tokens = set()
    for item in traces:
        classes, item_present = token_classes(item, cls_tokens, sep_tokens, punctuation)
        present |= item_present
        tokens = token_strings(item)
        first_tokens |= {None} if tokens is None else set(tokens[:, 0].tolist())
        item_sums, item_counts = score_sums(item, classes, parameters)
        item_sums.update(chance_sums(item, classes))
        if sums is None:
            sums, counts = item_sums, item_counts
        else:
            sums = {name: sums[name] + item_sums[name] for name in sums}
            counts = {name: counts[name] + item_counts[name] for name in counts}
    first = traces[0]
    source = "attention" if has_attention(first) else "stats"
    frame = scores_frame(sums, counts, present, first_tokens, layer_ids(first), source)
    frame.attrs["anomaly_parameters"] = parameters
    return frame


def scores_frame(sums: Dict[str, np.ndarray], counts: Dict[str, np.ndarray], present: np.ndarray,
                 first_tokens: set, layers: Sequence[int], source: str) -> pd.DataFrame:
    """head_scores's frame from the corpus sums (L, H) and eligible-query counts (L,) of
    score_sums, the class presence flags (3,) and the set of tokens at position 0 (None
    for a sequence without tokens). attnjax.profiling accumulates the same sums over a
    streamed corpus and builds its frame here, so both agree by construction."""
    means = {}
    for name in SCORE_COLUMNS:
        if name not in sums:
            means[name] = np.full(sums["entropy"].shape, np.nan)
            continue
        count = counts[_ELIGIBLE[name]][:, None]  # (L, 1): eligibility can differ by layer (windows)
        with np.errstate(invalid="ignore", divide="ignore"):
            means[name] = np.where(count > 0, sums[name] / np.maximum(count, 1), np.nan)
    for channel, name in enumerate(_CLASS_COLUMNS):
        if not present[channel]:
            means[name] = np.full_like(means[name], np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        for name in CHANCE_COLUMNS:  # (L,) per layer -> (L, H)
            means[name] = np.broadcast_to((sums[name] / counts["query"])[:, None], sums["entropy"].shape)
    first_label = "position 0"
    if len(first_tokens) == 1 and None not in first_tokens:
        first_label += f" {next(iter(first_tokens))!r}"
    targets = np.stack([sums["on_first"], sums["on_special"], sums["concentrated"] - sums["on_first"] - sums["on_special"]])
    labels = np.array([first_label, "[CLS]/[SEP]", "a fixed key"], dtype=object)[targets.argmax(0)]  # (L, H)
    means["concentrated_on"] = np.where(sums["concentrated"] > 0, labels, "")
    return _frame(layers, counts["query"][0], means, source)


def _frame(layers, n_queries, means, source) -> pd.DataFrame:
    num_layers, num_heads = means["entropy"].shape
    layer_column = np.repeat(np.asarray(layers, np.int64), num_heads)
    head_column = np.tile(np.arange(num_heads, dtype=np.int64), num_layers)
    columns = {"layer": layer_column, "head": head_column,
               "n_queries": np.full(num_layers * num_heads, int(n_queries), np.int64)}
    for name in SCORE_COLUMNS:
        columns[name] = means[name].reshape(-1).astype(np.float64)
    columns["concentrated_on"] = means["concentrated_on"].reshape(-1).astype(object)
    columns["source"] = source
    for name in CHANCE_COLUMNS:
        columns[name] = np.asarray(means[name], np.float64).reshape(-1)
    return pd.DataFrame(columns)


def chance_sums(trace: Trace, classes: np.ndarray) -> Dict[str, np.ndarray]:
    """Sums over non-padding queries (L,) of the chance baselines (module docstring): what a
    uniform row over each query's visible keys gives. O(T) per sequence (running sums)."""
    per_sequence = sequence_chance_sums(trace.mask, classes, causal=trace.causal, windows=trace_windows(trace))
    return {name: value.sum(0) for name, value in per_sequence.items()}


def sequence_chance_sums(mask, classes: np.ndarray, *, causal: bool, windows: Windows) -> Dict[str, np.ndarray]:
    """chance_sums of each sequence, (B, L) float64: mask (B, T), classes (B, T, 3), one
    window per layer (None: full attention). attnjax.profile adds these per text."""
    mask = np.asarray(mask, bool)  # (B, T)
    batch, seq = mask.shape
    position = np.arange(seq, dtype=np.float64)
    per_key = np.concatenate([mask[..., None], classes.astype(bool) & mask[..., None],
                              (mask * position)[..., None]], axis=-1).astype(np.float64)  # (B, T, 5)
    upto = np.cumsum(per_key, axis=1)  # (B, T, 5) over keys k <= i
    total = upto[:, -1:, :]  # (B, 1, 5)
    out = {name: [] for name in CHANCE_COLUMNS}
    for window in windows:
        if not causal:
            seen, before = np.broadcast_to(total, upto.shape), upto
            near = position[None] * before[..., 0] - before[..., 4]  # sum over k <= i of (i - k)
            far = (total[..., 4] - before[..., 4]) - position[None] * (total[..., 0] - before[..., 0])
            distance = near + far  # (B, T)
        else:
            lag = seq if window is None else window
            outside = np.pad(upto, ((0, 0), (lag, 0), (0, 0)))[:, :seq]  # (B, T, 5) over k <= i - W
            seen = upto - outside
            distance = position[None] * seen[..., 0] - seen[..., 4]
        keys = seen[..., 0]  # (B, T)
        with np.errstate(invalid="ignore", divide="ignore"):
            inverse = np.where(mask & (keys > 0), 1.0 / np.maximum(keys, 1.0), 0.0)
        for name, value in (("visible_keys", keys), ("chance_key", np.ones_like(keys)),
                            ("chance_cls", seen[..., 1]), ("chance_sep", seen[..., 2]),
                            ("chance_punctuation", seen[..., 3]), ("chance_distance", distance)):
            share = value if name == "visible_keys" else value * inverse
            out[name].append(np.where(mask, share, 0.0).sum(-1))  # (B,)
    return {name: np.stack(values, axis=1).astype(np.float64) for name, values in out.items()}  # (B, L)


@functools.partial(jax.jit, static_argnames=("causal", "windows"))
def query_weights(mask: jax.Array, input_ids: jax.Array, causal: bool,
                  windows: Windows = (None,)) -> Dict[str, jax.Array]:
    """(L, B, T) float32 selectors of the eligible queries of each score (module docstring).

    windows: one entry per layer (None: full attention, or the sliding window W); the
    leading axis of every selector has its length. O(T log T): no (T, T) array.
    """
    mask = mask.astype(bool)
    seq = mask.shape[1]
    position = jnp.arange(seq)[None, :]  # (1, T)
    before = jnp.pad(mask[:, :-1], ((0, 0), (1, 0)))  # (B, T) position i - 1 is a token
    after = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))  # (B, T) position i + 1 is a token
    latest = previous_occurrence(input_ids, mask)  # (B, T) latest earlier copy, -1 if none
    repeats = mask & (latest >= 0)  # (B, T)
    back = position - latest  # (B, T) tokens back to that copy (where repeats)
    by_window = {}
    for window in dict.fromkeys(windows):
        n_visible = visible_counts(mask, causal, window)  # (B, T)
        reach = seq if window is None else window  # keys i - reach < k <= i can be seen
        by_window[window] = {
            "query": mask,
            "spread": mask & (n_visible >= 2),
            "previous": mask & before & (reach >= 2),  # i - 1 inside the window
            "next": mask & after,
            "first": mask & (position < reach),  # key 0 inside the window
            "repeat": repeats & (back < reach),  # the copy itself inside the window
            "repeat_successor": repeats & (back <= reach),  # the key after the copy inside it
        }
    names = by_window[windows[0]].keys()
    return {name: jnp.stack([by_window[w][name] for w in windows]).astype(jnp.float32) for name in names}  # (L, B, T)


@functools.partial(jax.jit, static_argnames=("causal", "windows"))
def stats_terms(stats, mask: jax.Array, classes: jax.Array, *, causal: bool, windows: Windows = ()) -> Dict[str, jax.Array]:
    """Per-query quantities that the streaming AttentionStats give, (L, B, H, T) each.

    ``top2`` is max_prob (the stats know only the largest weight: a lower bound).
    windows: each layer's sliding window (() for none); normalized_entropy divides by ln
    of the keys each query sees in its layer.

    cls / sep / punctuation are returned per (L, B, H) as summed mass over the batch's
    queries (from ``received``), under the keys ``cls_total`` etc.
    """
    mask = mask.astype(bool)
    entropy = stats.entropy.astype(jnp.float32)  # (L, B, H, T)
    windows = layer_windows(windows, entropy.shape[0])
    by_window = {window: visible_counts(mask, causal, window) for window in dict.fromkeys(windows)}  # (B, T) each
    n_visible = jnp.stack([by_window[window] for window in windows]).astype(jnp.float32)  # (L, B, T)
    log_visible = jnp.log(jnp.maximum(n_visible, 2.0))[:, :, None, :]  # (L, B, 1, T)
    received = stats.received.astype(jnp.float32)  # (L, B, H, T)
    class_total = jnp.einsum("LBHK,BKC->LBHC", received, classes)  # (L, B, H, 3)
    return {
        "entropy": entropy,
        "normalized_entropy": entropy / log_visible,
        "max_weight": stats.max_prob.astype(jnp.float32),
        "self": stats.self_mass.astype(jnp.float32),
        "previous_token": stats.prev_mass.astype(jnp.float32),
        "first_token": stats.first_mass.astype(jnp.float32),
        "mean_distance": stats.mean_distance.astype(jnp.float32),
        "top2": stats.max_prob.astype(jnp.float32),
        "argmax": stats.argmax.astype(jnp.int32),
        "cls_total": class_total[..., 0],
        "sep_total": class_total[..., 1],
        "punctuation_total": class_total[..., 2],
    }


def trace_terms(trace: Trace, classes: np.ndarray) -> Dict[str, jax.Array]:
    """Per-query score quantities (L, B, H, T) of one Trace, from maps (validated) or stats."""
    windows = trace_windows(trace)
    if has_attention(trace):
        terms = attention_score_terms(
            trace.attention, trace.mask, trace.input_ids, jnp.asarray(classes), causal=trace.causal,
            windows=windows,
        )
        validate_attention(trace, terms)
        return terms
    terms = stats_terms(trace.stats, trace.mask, jnp.asarray(classes), causal=trace.causal, windows=windows)
    if has_qk(trace):  # Capture(stats=True, qkv=True): the map-only scores, tile by tile
        terms.update(qk_match_terms(trace, windows))
    return terms


def has_qk(trace: Trace) -> bool:
    """Whether a stats-only Trace also holds the queries and keys of every recorded layer, so
    next_token, duplicate and induction can be recomputed without the maps (analysis._qk_terms)."""
    return (trace.stats is not None and trace.queries is not None and trace.keys is not None
            and trace.queries.shape[0] == trace.stats.lse.shape[0])


@jax.jit
def _weighted_sums(terms: Dict[str, jax.Array], weights: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
    out = {}
    for name, value in terms.items():
        out[name] = jnp.einsum("LBHQ,LBQ->LH", value, weights[_ELIGIBLE[name]])  # (L, H)
    return out


def score_sums(trace: Trace, classes: np.ndarray, parameters: dict) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """Sums over eligible queries (L, H) of every available score, and the eligible query
    counts per layer (L,) (windows make them differ by layer)."""
    windows = trace_windows(trace)
    terms = trace_terms(trace, classes)
    weights = query_weights(trace.mask, trace.input_ids, causal=trace.causal, windows=windows)  # (L, B, T) each
    per_query = {name: terms[name] for name in SCORE_COLUMNS if name in terms}
    special = jnp.asarray(classes[..., 0] + classes[..., 1] > 0)  # (B, T)
    anomalies = anomaly_sums(
        terms["max_weight"], terms["top2"], terms["argmax"], trace.mask, trace.input_ids, special,
        windows=windows, **parameters,  # the keys of anomaly_parameters()
    )
    sums, anomalies = jax.device_get((_weighted_sums(per_query, weights), anomalies))
    sums = {name: np.asarray(value, np.float64) for name, value in sums.items()}
    for name in ANOMALY_SUMS:
        sums[name] = np.asarray(anomalies[name], np.float64)
    if not has_attention(trace):
        for name in _CLASS_COLUMNS:
            sums[name] = np.asarray(jax.device_get(terms[f"{name}_total"].sum(1)), np.float64)  # (L, H)
    counts = {name: np.asarray(value, np.float64).sum((1, 2)) for name, value in jax.device_get(weights).items()}  # (L,)
    for name, key in LONG_COUNTS.items():  # (L,) over sequences long enough to judge
        counts[name] = np.asarray(anomalies[key], np.float64)
    return sums, counts
